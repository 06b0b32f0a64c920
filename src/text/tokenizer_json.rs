//! The Hugging Face tokenizer files of a slow Llama tokenizer, as transformers writes them after converting it
//! (`LlamaConverter`: BPE vocabulary and merges from the sentencepiece model, `Prepend("▁")` + `Replace`
//! normalizer, byte-fallback decoder, BOS post-processor; the model's control and user-defined pieces as added
//! tokens) with extra added tokens, the way llava-hf's conversion adds `<image>` and `<pad>`.
use std::cmp::Ordering;
use std::collections::HashMap;

use super::sentencepiece::{PieceType, SPACE_SYMBOL};
use super::slow_tokenizer::{AddedToken, SlowTokenizer};
use crate::error::{Error, Result};

impl SlowTokenizer {
    /// Adds special tokens that are not in the vocabulary yet, with the next free ids, as `add_tokens` does.
    pub fn add_special_tokens(&mut self, contents: &[&str]) {
        for content in contents {
            if self.vocab_id(content).is_none() {
                let id = self.vocab_len() as u32;
                self.add(AddedToken {
                    content: content.to_string(),
                    id,
                    lstrip: false,
                    rstrip: false,
                    single_word: false,
                    special: true,
                });
            }
        }
    }

    /// `SentencePieceExtractor.extract` with piece scores: for every piece, each split into two pieces of the
    /// vocabulary is a merge ranked by the merged piece's score (higher first), then by the lengths of its halves
    /// (longer first); equal keys keep the order of the pieces and, within one, the order of the halves' ids.
    fn merges(&self) -> Vec<(String, String)> {
        let vocab: HashMap<&str, u32> = self.sp.pieces().enumerate().map(|(i, (p, _, _))| (p, i as u32)).collect();
        let mut merges: Vec<(&str, &str, f32)> = Vec::new();
        for (piece, score, _) in self.sp.pieces() {
            let mut local = Vec::new();
            for (split, _) in piece.char_indices().skip(1) {
                let (left, right) = piece.split_at(split);
                if vocab.contains_key(left) && vocab.contains_key(right) {
                    local.push((left, right, score));
                }
            }
            local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
            merges.extend(local);
        }
        merges.sort_by(|a, b| {
            let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
            let (ka, kb) = (key(a), key(b));
            kb.0.total_cmp(&ka.0).then(kb.1.cmp(&ka.1)).then(kb.2.cmp(&ka.2)).then(Ordering::Equal)
        });
        merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect()
    }

    fn content_of(&self, id: u32) -> String {
        match self.added_by_id.get(&id) {
            Some(&i) => self.added[i].content.clone(),
            None => self.sp.id_to_piece(id).unwrap_or_default().to_string(),
        }
    }

    /// The added tokens of the converted fast tokenizer, by id: this tokenizer's, and the converter's from the
    /// model's control pieces (special) and user-defined pieces.
    fn converted_added_tokens(&self) -> Vec<AddedToken> {
        let from_model = self.sp.pieces().enumerate().filter_map(|(id, (text, _, kind))| {
            let kept = matches!(kind, PieceType::Control | PieceType::UserDefined)
                && !self.added_by_content.contains_key(text);
            kept.then(|| AddedToken {
                content: text.to_string(),
                id: id as u32,
                lstrip: false,
                rstrip: false,
                single_word: false,
                special: kind == PieceType::Control,
            })
        });
        let mut added: Vec<AddedToken> = self.added.iter().cloned().chain(from_model).collect();
        added.sort_by_key(|t| t.id);
        added
    }

    /// `tokenizer.json` of the converted fast tokenizer.
    pub fn tokenizer_json(&self) -> Result<serde_json::Value> {
        if !self.legacy {
            return Err(Error::Tokenizer(
                "the tokenizer is not legacy (tokenizer_config.json legacy: false); stic writes tokenizer.json only \
                 for legacy Llama tokenizers, as LLaVA-v1.6-Mistral's is"
                    .into(),
            ));
        }
        let added = self.converted_added_tokens();
        let added: Vec<serde_json::Value> = added
            .iter()
            .map(|t| {
                serde_json::json!({"id": t.id, "content": t.content, "single_word": t.single_word, "lstrip": t.lstrip,
                                   "rstrip": t.rstrip, "normalized": false, "special": t.special})
            })
            .collect();
        let mut normalizers = Vec::new();
        if self.add_prefix_space {
            normalizers.push(serde_json::json!({"type": "Prepend", "prepend": SPACE_SYMBOL.to_string()}));
        }
        normalizers.push(
            serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_SYMBOL.to_string()}),
        );
        let mut decoders = vec![
            serde_json::json!({"type": "Replace", "pattern": {"String": SPACE_SYMBOL.to_string()}, "content": " "}),
            serde_json::json!({"type": "ByteFallback"}),
            serde_json::json!({"type": "Fuse"}),
        ];
        if self.add_prefix_space {
            decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let (bos, eos) = (self.content_of(self.bos_id), self.content_of(self.eos_id));
        let special = |name: &str, type_id: u32| serde_json::json!({"SpecialToken": {"id": name, "type_id": type_id}});
        let sequence = |name: &str, type_id: u32| serde_json::json!({"Sequence": {"id": name, "type_id": type_id}});
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut special_tokens = serde_json::Map::new();
        for (type_id, part, out) in [(0, "A", &mut single), (1, "B", &mut pair)] {
            if self.add_bos {
                out.push(special(&bos, type_id));
            }
            out.push(sequence(part, type_id));
            if self.add_eos {
                out.push(special(&eos, type_id));
            }
        }
        let pair: Vec<serde_json::Value> = single.iter().cloned().chain(pair).collect();
        for (add, name, id) in [(self.add_bos, &bos, self.bos_id), (self.add_eos, &eos, self.eos_id)] {
            if add {
                special_tokens.insert(name.clone(), serde_json::json!({"id": name, "ids": [id], "tokens": [name]}));
            }
        }
        let vocab: serde_json::Map<String, serde_json::Value> =
            self.sp.pieces().enumerate().map(|(i, (p, _, _))| (p.to_string(), serde_json::Value::from(i))).collect();
        let merges: Vec<[String; 2]> = self.merges().into_iter().map(|(l, r)| [l, r]).collect();
        Ok(serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens},
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": self.content_of(self.sp.unk_id()),
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": self.sp.byte_fallback(),
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            },
        }))
    }

    /// `tokenizer_config.json` and `special_tokens_map.json` as transformers saves this tokenizer.
    pub fn config_files(&self, pad: &str) -> [(&'static str, serde_json::Value); 2] {
        let added = self.converted_added_tokens();
        let decoder: serde_json::Map<String, serde_json::Value> = added
            .iter()
            .map(|t| {
                (t.id.to_string(), serde_json::json!({"content": t.content, "lstrip": t.lstrip, "normalized": false,
                                                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}))
            })
            .collect();
        let (bos, eos, unk) = (self.content_of(self.bos_id), self.content_of(self.eos_id), self.unk_content.clone());
        let entry = |content: &str| serde_json::json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
        [
            (
                "tokenizer_config.json",
                serde_json::json!({
                    "add_bos_token": self.add_bos,
                    "add_eos_token": self.add_eos,
                    "add_prefix_space": self.add_prefix_space,
                    "added_tokens_decoder": decoder,
                    "bos_token": bos,
                    "clean_up_tokenization_spaces": self.clean_up_spaces,
                    "eos_token": eos,
                    "extra_special_tokens": {},
                    "legacy": self.legacy,
                    "model_max_length": 1e30,
                    "pad_token": pad,
                    "sp_model_kwargs": {},
                    "spaces_between_special_tokens": false,
                    "tokenizer_class": "LlamaTokenizer",
                    "unk_token": unk,
                    "use_default_system_prompt": false,
                }),
            ),
            (
                "special_tokens_map.json",
                serde_json::json!({"bos_token": entry(&bos), "eos_token": entry(&eos), "pad_token": entry(pad), "unk_token": entry(&unk)}),
            ),
        ]
    }
}
