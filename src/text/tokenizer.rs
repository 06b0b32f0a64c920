//! The Hugging Face `tokenizer.json` of the model, with the ids LLaVA needs.
use std::path::Path;

use crate::error::{Error, Result};

pub const IMAGE_TOKEN: &str = "<image>";

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: i64,
    pub eos_id: i64,
    pub pad_id: i64,
    pub image_id: i64,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer(format!(
                "{} not found: the model folder needs a tokenizer.json (the Mistral-7B one ships in \
                 third_party/mistral-7b-tokenizer/)",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .map(i64::from)
                .ok_or_else(|| Error::Tokenizer(format!("{}: token {token} is not in the vocabulary", path.display())))
        };
        Ok(TextTokenizer {
            bos_id: id("<s>")?,
            eos_id: id("</s>")?,
            image_id: id(IMAGE_TOKEN)?,
            pad_id: id("<pad>").or_else(|_| id("<unk>"))?,
            inner,
        })
    }

    /// Token ids of `text`; `add_special` adds BOS as the Hugging Face tokenizer call does by default.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let encoding = self.inner.encode(text, add_special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter(|&&i| i >= 0).map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
