//! The model's tokenizer, as the chosen processing reads it: LLaVA's code (the slow sentencepiece tokenizer and
//! `tokenizer_image_token`) or transformers' processor (`tokenizer.json`, `<image>` an added token). Either way
//! an image's place in the ids is [`IMAGE_TOKEN_INDEX`], outside the vocabulary, as in LLaVA's code.
use std::path::{Path, PathBuf};

use super::slow_tokenizer::{SlowTokenizer, SpecialTokenNames};
use crate::error::{Error, Result};
use crate::image::Processing;

pub const IMAGE_TOKEN: &str = "<image>";

/// LLaVA's `IMAGE_TOKEN_INDEX`: where an image goes in the ids; never looked up in an embedding.
pub const IMAGE_TOKEN_INDEX: i64 = -200;

// One per loaded tokenizer: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    /// `tokenizer.json` with the Hugging Face `tokenizers` library (transformers' fast tokenizer).
    Fast { inner: tokenizers::Tokenizer, image_id: Option<u32> },
    /// `tokenizer.model` with transformers' slow `LlamaTokenizer` rules.
    Slow(SlowTokenizer),
}

pub struct TextTokenizer {
    backend: Backend,
    processing: Processing,
    /// The tokenizer file, for messages.
    source: PathBuf,
    /// Embeddings of the model the ids are for; an id at or beyond it is refused.
    model_vocab: Option<usize>,
    pub bos_id: i64,
    pub eos_id: i64,
    pub pad_id: i64,
    /// Always [`IMAGE_TOKEN_INDEX`].
    pub image_id: i64,
}

impl TextTokenizer {
    /// The tokenizer of a model folder for `processing`: LLaVA's reads `tokenizer.model` (LLaVA loads the slow
    /// tokenizer); transformers' reads `tokenizer.json`, or converts `tokenizer.model` as transformers does when
    /// the folder has no `tokenizer.json` (the slow tokenizer itself where it is not legacy).
    pub fn from_dir(dir: &Path, processing: Processing) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let model = dir.join("tokenizer.model");
        match processing {
            Processing::Transformers if json.is_file() => {
                let inner = tokenizers::Tokenizer::from_file(&json)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?;
                Self::fast(inner, json, processing, SpecialTokenNames::from_dir(dir)?)
            }
            Processing::Transformers if !model.is_file() => Err(Error::Tokenizer(format!(
                "{} not found, nor tokenizer.model: the model folder needs its tokenizer (the Mistral-7B one ships \
                 in third_party/mistral-7b-tokenizer/)",
                json.display()
            ))),
            Processing::Llava if !model.is_file() => Err(Error::Tokenizer(format!(
                "{} not found: LLaVA's code path (--processing llava, the default for original LLaVA checkpoints) \
                 tokenizes with the sentencepiece tokenizer.model, as LLaVA loads the slow tokenizer; put the \
                 model's tokenizer.model in the folder, or pass --processing transformers to use tokenizer.json",
                model.display()
            ))),
            _ => Self::from_slow(SlowTokenizer::from_dir(dir)?, model, processing),
        }
    }

    /// The slow tokenizer of `tokenizer.model`; for transformers' processing, where it is legacy, the fast one
    /// transformers converts from it (`LlamaConverter`, which prepends the dummy prefix even where the
    /// sentencepiece model leaves it out, as Yi's does): stic's converter writes the same tokenizer.json. The
    /// special tokens' ids are the slow tokenizer's either way.
    fn from_slow(slow: SlowTokenizer, model: PathBuf, processing: Processing) -> Result<Self> {
        let (bos, eos) = (slow.bos_id, slow.eos_id);
        let pad = slow.pad_id.unwrap_or(slow.sentencepiece().unk_id());
        let backend = if processing == Processing::Transformers && slow.legacy {
            let inner = slow
                .tokenizer_json()?
                .to_string()
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| Error::Tokenizer(format!("{} converted: {e}", model.display())))?;
            Backend::Fast { image_id: inner.token_to_id(IMAGE_TOKEN), inner }
        } else {
            Backend::Slow(slow)
        };
        Ok(TextTokenizer {
            bos_id: i64::from(bos),
            eos_id: i64::from(eos),
            pad_id: i64::from(pad),
            image_id: IMAGE_TOKEN_INDEX,
            backend,
            processing,
            source: model,
            model_vocab: None,
        })
    }

    /// The Mistral-7B tokenizer.json that stic ships (`init-tiny` writes it), for a model made in memory.
    pub fn shipped_mistral(processing: Processing) -> Result<Self> {
        if processing == Processing::Llava {
            return Err(Error::Input(
                "--random-weights comes with the shipped tokenizer.json only, which LLaVA's code path does not \
                 read: pass --processing transformers"
                    .into(),
            ));
        }
        let (name, bytes) = crate::model::tiny::TOKENIZER_FILES[0];
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer(format!("{name}: {e}")))?;
        let names = SpecialTokenNames { bos: "<s>".into(), eos: "</s>".into(), unk: "<unk>".into(), pad: None };
        Self::fast(inner, PathBuf::from(name), processing, names)
    }

    /// The fast tokenizer, its special tokens named as the folder's tokenizer files name them (Yi's
    /// `<|startoftext|>` and `<|im_end|>` for LLaVA-v1.6-34B), `<s>` / `</s>` by default.
    fn fast(
        inner: tokenizers::Tokenizer,
        source: PathBuf,
        processing: Processing,
        names: SpecialTokenNames,
    ) -> Result<Self> {
        let id = |token: &str| inner.token_to_id(token).map(i64::from);
        let missing = |token: &str| {
            Error::Tokenizer(format!(
                "{}: token {token} is not in the vocabulary (special_tokens_map.json or tokenizer_config.json name \
                 it): the tokenizer files belong to different models",
                source.display()
            ))
        };
        let pad = id("<pad>").or_else(|| names.pad.as_deref().and_then(id)).or_else(|| id(&names.unk));
        Ok(TextTokenizer {
            bos_id: id(&names.bos).ok_or_else(|| missing(&names.bos))?,
            eos_id: id(&names.eos).ok_or_else(|| missing(&names.eos))?,
            pad_id: pad.ok_or_else(|| missing(&names.unk))?,
            image_id: IMAGE_TOKEN_INDEX,
            backend: Backend::Fast { image_id: inner.token_to_id(IMAGE_TOKEN), inner },
            processing,
            source,
            model_vocab: None,
        })
    }

    /// Refuse ids that the model has no embedding for (a tokenizer of another model).
    pub fn limit_to_model_vocab(&mut self, vocab_size: usize) {
        self.model_vocab = Some(vocab_size);
    }

    fn encode_chunk(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let ids: Vec<u32> = match &self.backend {
            Backend::Fast { inner, .. } => {
                inner.encode(text, add_special).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec()
            }
            Backend::Slow(slow) => slow.encode(text, add_special),
        };
        Ok(ids.into_iter().map(i64::from).collect())
    }

    /// Token ids of `text` with [`IMAGE_TOKEN_INDEX`] where each `<image>` stands; `add_special` adds BOS as the
    /// tokenizer call does by default.
    ///
    /// LLaVA (`tokenizer_image_token`): each stretch between `<image>`s is tokenized on its own with the special
    /// tokens, and the BOS of every stretch after the first is dropped. transformers: the whole text at once,
    /// `<image>` being an added token; a tokenizer without it is given the stretches one by one, which is what
    /// an added token amounts to.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let ids = match (&self.backend, self.processing) {
            (Backend::Fast { image_id: Some(image), .. }, Processing::Transformers) => {
                let image = i64::from(*image);
                self.encode_chunk(text, add_special)?
                    .into_iter()
                    .map(|id| if id == image { IMAGE_TOKEN_INDEX } else { id })
                    .collect()
            }
            (_, Processing::Llava) => {
                let chunks =
                    text.split(IMAGE_TOKEN).map(|c| self.encode_chunk(c, add_special)).collect::<Result<Vec<_>>>()?;
                let offset = usize::from(chunks[0].first() == Some(&self.bos_id));
                let mut ids = chunks[0][..offset].to_vec();
                for (i, chunk) in chunks.iter().enumerate() {
                    if i > 0 {
                        ids.push(IMAGE_TOKEN_INDEX);
                    }
                    ids.extend_from_slice(chunk.get(offset..).unwrap_or_default());
                }
                ids
            }
            (_, Processing::Transformers) => {
                let mut ids = Vec::new();
                for (i, chunk) in text.split(IMAGE_TOKEN).enumerate() {
                    if i > 0 {
                        ids.push(IMAGE_TOKEN_INDEX);
                    }
                    ids.extend(self.encode_chunk(chunk, add_special && i == 0)?);
                }
                ids
            }
        };
        if let Some(vocab) = self.model_vocab {
            if let Some(&bad) = ids.iter().find(|&&id| id >= vocab as i64) {
                let token = self.decode(&[bad], false).unwrap_or_default();
                return Err(Error::Tokenizer(format!(
                    "{} gives id {bad} ({token:?}) but the model has {vocab} token embeddings (vocab_size in \
                     config.json): the tokenizer belongs to another model; use the tokenizer files of this checkpoint",
                    self.source.display()
                )));
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        match &self.backend {
            Backend::Fast { inner, .. } => {
                inner.decode(&ids, skip_special).map_err(|e| Error::Tokenizer(e.to_string()))
            }
            Backend::Slow(slow) => Ok(slow.decode(&ids, skip_special)),
        }
    }

    /// The id llava-hf's conversion gives `<image>`: its id where the tokenizer has one, else the next after the
    /// vocabulary (32000 for Llama's and Mistral's tokenizers, 64000 for Yi's).
    pub fn appended_image_id(&self) -> i64 {
        let existing = match &self.backend {
            Backend::Fast { image_id, .. } => *image_id,
            Backend::Slow(slow) => slow.vocab_id(IMAGE_TOKEN),
        };
        existing.map_or(self.vocab_size() as i64, i64::from)
    }

    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Fast { inner, .. } => inner.get_vocab_size(true),
            Backend::Slow(slow) => slow.vocab_len(),
        }
    }
}
