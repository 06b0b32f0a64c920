//! The slow `LlamaTokenizer` of transformers (what LLaVA loads with `use_fast=False`): sentencepiece on each
//! stretch of text between added tokens, the added tokens (the special tokens among them) matched first with
//! their lstrip / rstrip / single_word rules, BOS / EOS as `add_bos_token` / `add_eos_token` say, and both the
//! `legacy` behaviour (the default, and Mistral's) and the newer one.
use std::collections::HashMap;
use std::path::Path;

use super::sentencepiece::{SentencePiece, SPACE_SYMBOL};
use crate::error::{Error, Result};
use crate::fsutil::read_json;

#[derive(Debug, Clone)]
pub(super) struct AddedToken {
    pub(super) content: String,
    pub(super) id: u32,
    pub(super) lstrip: bool,
    pub(super) rstrip: bool,
    pub(super) single_word: bool,
    pub(super) special: bool,
}

pub struct SlowTokenizer {
    /// As transformers loads it: with `legacy: false` the dummy prefix is switched off.
    pub(super) sp: SentencePiece,
    pub(super) added: Vec<AddedToken>,
    pub(super) added_by_content: HashMap<String, usize>,
    pub(super) added_by_id: HashMap<u32, usize>,
    /// `all_special_tokens`: bos, eos, unk, pad and the additional special tokens.
    pub(super) special_contents: Vec<String>,
    pub(super) legacy: bool,
    pub(super) add_prefix_space: bool,
    pub(super) add_bos: bool,
    pub(super) add_eos: bool,
    pub(super) clean_up_spaces: bool,
    pub(super) unk_content: String,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: Option<u32>,
}

/// A token as tokenizer_config.json / special_tokens_map.json write it: a string or an AddedToken object.
fn token_content(value: &serde_json::Value) -> Option<String> {
    value.as_str().map(String::from).or_else(|| value.get("content")?.as_str().map(String::from))
}

fn flag(value: &serde_json::Value, key: &str) -> bool {
    value.get(key).and_then(|v| v.as_bool()).unwrap_or(false)
}

fn read_optional_json(path: &Path) -> Result<serde_json::Value> {
    if path.is_file() {
        read_json(path)
    } else {
        Ok(serde_json::Value::Null)
    }
}

/// The contents of a tokenizer's special tokens, as `special_tokens_map.json` (first) or `tokenizer_config.json`
/// name them, with `LlamaTokenizer`'s defaults.
pub(super) struct SpecialTokenNames {
    pub(super) bos: String,
    pub(super) eos: String,
    pub(super) unk: String,
    pub(super) pad: Option<String>,
}

impl SpecialTokenNames {
    fn of(config: &serde_json::Value, map: &serde_json::Value) -> Self {
        let special =
            |key: &str| map.get(key).and_then(token_content).or_else(|| config.get(key).and_then(token_content));
        SpecialTokenNames {
            bos: special("bos_token").unwrap_or_else(|| "<s>".into()),
            eos: special("eos_token").unwrap_or_else(|| "</s>".into()),
            unk: special("unk_token").unwrap_or_else(|| "<unk>".into()),
            pad: special("pad_token"),
        }
    }

    /// Those of a model folder (the defaults when it has neither file).
    pub(super) fn from_dir(dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        Ok(Self::of(&config, &read_optional_json(&dir.join("special_tokens_map.json"))?))
    }
}

impl SlowTokenizer {
    /// Reads `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json` as
    /// `LlamaTokenizer.from_pretrained` does.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let model_path = dir.join("tokenizer.model");
        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json(&config_path)?;
        let map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        if let Some(class) = config.get("tokenizer_class").and_then(|v| v.as_str()) {
            if !matches!(class, "LlamaTokenizer" | "LlamaTokenizerFast") {
                return Err(Error::Tokenizer(format!(
                    "{}: tokenizer_class {class} is not supported with tokenizer.model (LlamaTokenizer, as LLaVA-v1.6-Mistral ships)",
                    config_path.display()
                )));
            }
        }
        let bool_or = |key: &str, default: bool| config.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
        let legacy = bool_or("legacy", true);
        let SpecialTokenNames { bos, eos, unk, pad } = SpecialTokenNames::of(&config, &map);
        let mut additional: Vec<String> = map
            .get("additional_special_tokens")
            .or_else(|| config.get("additional_special_tokens"))
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(token_content).collect())
            .unwrap_or_default();
        let mut special_contents = vec![bos.clone(), eos.clone(), unk.clone()];
        special_contents.extend(pad.clone());
        special_contents.append(&mut additional);
        let bytes = std::fs::read(&model_path).map_err(|e| Error::io(&model_path, e))?;
        let sp = if legacy {
            SentencePiece::from_bytes(&bytes)
        } else {
            SentencePiece::from_bytes_without_dummy_prefix(&bytes)
        }
        .map_err(|why| Error::Tokenizer(format!("{}: {why}", model_path.display())))?;
        let mut tok = SlowTokenizer {
            sp,
            added: Vec::new(),
            added_by_content: HashMap::new(),
            added_by_id: HashMap::new(),
            special_contents: Vec::new(),
            legacy,
            add_prefix_space: bool_or("add_prefix_space", true),
            add_bos: bool_or("add_bos_token", true),
            add_eos: bool_or("add_eos_token", false),
            clean_up_spaces: bool_or("clean_up_tokenization_spaces", false),
            unk_content: unk.clone(),
            bos_id: 0,
            eos_id: 0,
            pad_id: None,
        };
        if let Some(decoder) = config.get("added_tokens_decoder").and_then(|v| v.as_object()) {
            let mut entries: Vec<(u32, &serde_json::Value)> = Vec::new();
            for (id, token) in decoder {
                let id = id.parse::<u32>().map_err(|_| {
                    Error::Tokenizer(format!("{}: added token id {id} is not a number", config_path.display()))
                })?;
                entries.push((id, token));
            }
            entries.sort_by_key(|(id, _)| *id);
            for (id, token) in entries {
                let content = token_content(token).ok_or_else(|| {
                    Error::Tokenizer(format!("{}: added token {id} has no content", config_path.display()))
                })?;
                tok.add(AddedToken {
                    content,
                    id,
                    lstrip: flag(token, "lstrip"),
                    rstrip: flag(token, "rstrip"),
                    single_word: flag(token, "single_word"),
                    special: flag(token, "special"),
                });
            }
        }
        if let Some(extra) = read_optional_json(&dir.join("added_tokens.json"))?.as_object() {
            for (content, id) in extra {
                if let Some(id) = id.as_u64() {
                    if !tok.added_by_content.contains_key(content) {
                        tok.add(AddedToken {
                            content: content.clone(),
                            id: id as u32,
                            lstrip: false,
                            rstrip: false,
                            single_word: false,
                            special: false,
                        });
                    }
                }
            }
        }
        // The special tokens become added tokens too, with the id they have in the vocabulary or a new one.
        for content in &special_contents {
            if !tok.added_by_content.contains_key(content) {
                let id = tok.vocab_id(content).unwrap_or_else(|| tok.vocab_len() as u32);
                tok.add(AddedToken {
                    content: content.clone(),
                    id,
                    lstrip: false,
                    rstrip: false,
                    single_word: false,
                    special: true,
                });
            }
        }
        tok.bos_id = tok.vocab_id(&bos).expect("added above");
        tok.eos_id = tok.vocab_id(&eos).expect("added above");
        tok.pad_id = pad.as_deref().and_then(|p| tok.vocab_id(p));
        tok.special_contents = special_contents;
        Ok(tok)
    }

    pub(super) fn add(&mut self, token: AddedToken) {
        let index = self.added.len();
        self.added_by_content.insert(token.content.clone(), index);
        self.added_by_id.insert(token.id, index);
        self.added.push(token);
    }

    /// The size of `get_vocab()`: sentencepiece pieces and added tokens.
    pub fn vocab_len(&self) -> usize {
        let beyond = self.added.iter().filter(|t| t.id as usize >= self.sp.len()).count();
        self.sp.len() + beyond
    }

    /// The id of a token in `get_vocab()`: an added token, or a sentencepiece piece.
    pub fn vocab_id(&self, content: &str) -> Option<u32> {
        if let Some(&i) = self.added_by_content.get(content) {
            return Some(self.added[i].id);
        }
        let id = self.sp.piece_to_id(content);
        (id != self.sp.unk_id() || self.sp.id_to_piece(id) == Some(content)).then_some(id)
    }

    pub fn sentencepiece(&self) -> &SentencePiece {
        &self.sp
    }

    /// Splits `text` around the added tokens (leftmost, longest match), as transformers' `Trie.split`.
    fn split_added<'t>(&self, text: &'t str) -> Vec<(&'t str, Option<usize>)> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < text.len() {
            let rest = &text[i..];
            let found = self
                .added
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.content.is_empty() && rest.starts_with(t.content.as_str()))
                .max_by_key(|(index, t)| (t.content.len(), std::cmp::Reverse(*index)));
            match found {
                Some((index, t)) => {
                    if start < i {
                        out.push((&text[start..i], None));
                    }
                    out.push((&text[i..i + t.content.len()], Some(index)));
                    i += t.content.len();
                    start = i;
                }
                None => i += rest.chars().next().expect("non-empty").len_utf8(),
            }
        }
        if start < text.len() {
            out.push((&text[start..], None));
        }
        out
    }

    /// `PreTrainedTokenizer.tokenize` then `convert_tokens_to_ids`: the ids of `text` without BOS or EOS.
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        let prepared;
        let text = if self.legacy || text.is_empty() {
            text
        } else {
            let replaced = text.replace(SPACE_SYMBOL, " ");
            prepared = if self.add_prefix_space { format!("{SPACE_SYMBOL}{replaced}") } else { replaced };
            &prepared
        };
        let mut parts: Vec<(String, Option<usize>)> =
            self.split_added(text).into_iter().map(|(s, t)| (s.to_string(), t)).collect();
        for i in 0..parts.len() {
            let Some(index) = parts[i].1 else { continue };
            let token = &self.added[index];
            if token.rstrip && i + 1 < parts.len() && parts[i + 1].1.is_none() {
                parts[i + 1].0 = parts[i + 1].0.trim_start().to_string();
            }
            if token.lstrip && i > 0 && parts[i - 1].1.is_none() {
                parts[i - 1].0 = parts[i - 1].0.trim_end().to_string();
            }
            if token.single_word
                && i > 0
                && parts[i - 1].1.is_none()
                && !parts[i - 1].0.is_empty()
                && !parts[i - 1].0.ends_with(' ')
            {
                let content = std::mem::take(&mut parts[i].0);
                parts[i - 1].0.push_str(&content);
                parts[i].1 = None;
            } else if token.single_word
                && i + 1 < parts.len()
                && parts[i + 1].1.is_none()
                && !parts[i + 1].0.is_empty()
                && !parts[i + 1].0.starts_with(' ')
            {
                let content = std::mem::take(&mut parts[i].0);
                parts[i + 1].0.insert_str(0, &content);
                parts[i].1 = None;
            }
        }
        let mut ids = Vec::new();
        for (part, added) in parts {
            if part.is_empty() {
                continue;
            }
            match added {
                Some(index) => ids.push(self.added[index].id),
                None => ids.extend(self.encode_piece(&part).into_iter().map(|id| self.id_with_added_vocab(id))),
            }
        }
        if !self.legacy && ids.len() > 1 {
            let space = self.sp.piece_to_id(&SPACE_SYMBOL.to_string());
            let second_is_special =
                self.added_by_id.get(&ids[1]).is_some_and(|&i| self.special_contents.contains(&self.added[i].content));
            if ids[0] == space && second_is_special {
                ids.remove(0);
            }
        }
        ids
    }

    /// `LlamaTokenizer._tokenize`.
    fn encode_piece(&self, text: &str) -> Vec<u32> {
        if self.legacy || !(text.starts_with(SPACE_SYMBOL) || text.starts_with(' ')) {
            return self.sp.encode(text);
        }
        let unk_len = self.sp.encode(&self.unk_content).len();
        let ids = self.sp.encode(&format!("{}{text}", self.unk_content));
        if ids.len() >= unk_len {
            ids[unk_len..].to_vec()
        } else {
            ids
        }
    }

    /// Pieces go back through `convert_tokens_to_ids`, where an added token with the same text wins.
    fn id_with_added_vocab(&self, id: u32) -> u32 {
        self.sp.id_to_piece(id).and_then(|p| self.added_by_content.get(p)).map_or(id, |&i| self.added[i].id)
    }

    /// Ids of `text` as `tokenizer(text).input_ids` gives them.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        let mut ids = self.encode_text(text);
        if add_special {
            if self.add_bos {
                ids.insert(0, self.bos_id);
            }
            if self.add_eos {
                ids.push(self.eos_id);
            }
        }
        ids
    }

    fn is_special(&self, content: &str) -> bool {
        self.special_contents.iter().any(|s| s == content)
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)`; ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut sub_texts: Vec<String> = Vec::new();
        let mut current: Vec<String> = Vec::new();
        for &id in ids {
            let (token, added) = match self.added_by_id.get(&id) {
                Some(&i) => (self.added[i].content.clone(), Some(&self.added[i])),
                None => match self.sp.id_to_piece(id) {
                    Some(p) => (p.to_string(), None),
                    None => continue,
                },
            };
            let special = self.is_special(&token) || added.is_some_and(|t| t.special);
            if skip_special && special {
                continue;
            }
            if added.is_some() && !special {
                if !current.is_empty() {
                    let text = self.tokens_to_string(std::mem::take(&mut current));
                    if !text.is_empty() {
                        sub_texts.push(text);
                    }
                }
                sub_texts.push(token);
            } else {
                current.push(token);
            }
        }
        if !current.is_empty() {
            sub_texts.push(self.tokens_to_string(current));
        }
        let text = sub_texts.concat();
        if !self.clean_up_spaces {
            return text;
        }
        [
            (" .", "."),
            (" ?", "?"),
            (" !", "!"),
            (" ,", ","),
            (" ' ", "'"),
            (" n't", "n't"),
            (" 'm", "'m"),
            (" 's", "'s"),
            (" 've", "'ve"),
            (" 're", "'re"),
        ]
        .iter()
        .fold(text, |t, (from, to)| t.replace(from, to))
    }

    /// `LlamaTokenizer.convert_tokens_to_string`.
    fn tokens_to_string(&self, mut tokens: Vec<String>) -> String {
        if self.add_prefix_space {
            if let Some(rest) = tokens[0].strip_prefix(SPACE_SYMBOL) {
                tokens[0] = rest.to_string();
            }
        }
        let mut out = String::new();
        let mut pieces: Vec<&str> = Vec::new();
        let mut prev_is_special = false;
        for (i, token) in tokens.iter().enumerate() {
            if self.is_special(token) {
                if !prev_is_special && i != 0 && self.legacy {
                    out.push(' ');
                }
                out.push_str(&self.sp.decode_pieces(&pieces));
                out.push_str(token);
                pieces.clear();
                prev_is_special = true;
            } else {
                if prev_is_special && i == 1 && self.add_prefix_space && !token.starts_with(SPACE_SYMBOL) {
                    out.push(' ');
                }
                pieces.push(token);
                prev_is_special = false;
            }
        }
        out.push_str(&self.sp.decode_pieces(&pieces));
        out
    }
}
