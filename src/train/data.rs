//! Training data: STIC preference pairs and LLaVA-format conversations, read with line-numbered errors.
use serde::Deserialize;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::method::infuse::{InstructionEntry, Turn, GPT, HUMAN};

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One record of the STIC preference format (the schema of `stic-coco-preference-6k`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct PreferencePair {
    pub image: String,
    pub chosen: Vec<Message>,
    /// Absent in a file meant only for `prefs-to-sft`, which reads the chosen side alone as the official converter
    /// does; DPO refuses a pair without it.
    #[serde(default)]
    pub rejected: Vec<Message>,
}

impl PreferencePair {
    /// The shared user prompt and the two responses.
    pub fn parts(&self) -> std::result::Result<(&str, &str, &str), String> {
        let (prompt, chosen) = self.chosen_turn()?;
        let rejected = assistant_turn(&self.rejected, "rejected")?;
        if rejected.trim().is_empty() {
            return Err("empty rejected response".into());
        }
        Ok((prompt, chosen, rejected))
    }

    /// The user prompt and the chosen response, all that an SFT conversion reads.
    pub fn chosen_turn(&self) -> std::result::Result<(&str, &str), String> {
        let prompt = message(&self.chosen, 0, "user", "chosen")?;
        let chosen = assistant_turn(&self.chosen, "chosen")?;
        if chosen.trim().is_empty() {
            return Err("empty chosen response".into());
        }
        Ok((prompt, chosen))
    }
}

fn message<'a>(msgs: &'a [Message], idx: usize, role: &str, side: &str) -> std::result::Result<&'a str, String> {
    match msgs.get(idx) {
        Some(m) if m.role == role => Ok(&m.content),
        Some(m) => Err(format!("{side}[{idx}] has role '{}', expected '{role}'", m.role)),
        None => Err(format!("{side} needs a user and an assistant message")),
    }
}

fn assistant_turn<'a>(msgs: &'a [Message], side: &str) -> std::result::Result<&'a str, String> {
    message(msgs, 1, "assistant", side)
}

/// The usable records of a data file, each with its position in the file, and why the others were skipped.
pub type Records<T> = (Vec<(usize, T)>, Vec<String>);

/// Records of a JSON list or of JSON lines, with the line (JSONL) or position (JSON list) of each, counted from 1.
pub fn read_records<T: serde::de::DeserializeOwned>(path: &Path, skip_bad: bool) -> Result<Records<T>> {
    let text = crate::fsutil::read_text(path)?;
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    let mut bad = |what: String| -> Result<()> {
        if skip_bad {
            skipped.push(what);
            Ok(())
        } else {
            Err(Error::Input(format!("{what} (pass --skip-bad to skip bad records)")))
        }
    };
    if text.trim_start().starts_with('[') {
        let values: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| Error::Input(format!("{}: invalid JSON at line {}: {e}", path.display(), e.line())))?;
        for (number, v) in (1..).zip(values) {
            match serde_json::from_value::<T>(v) {
                Ok(r) => records.push((number, r)),
                Err(e) => bad(format!("{}: record {number}: {e}", path.display()))?,
            }
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<T>(line) {
                Ok(r) => records.push((i + 1, r)),
                Err(e) => bad(format!("{}: line {}: {e}", path.display(), i + 1))?,
            }
        }
    }
    if records.is_empty() {
        return Err(Error::Input(format!("{}: no usable records", path.display())));
    }
    Ok((records, skipped))
}

/// Stage 1 as supervised fine-tuning (the paper's Table 3): each pair's chosen turn as a LLaVA-format
/// conversation, made as the official `scripts/convert_pref_to_sft.py` makes it. The id is the image name less
/// `COCO_train2014_` and `.jpg`; the human turn is the stored prompt as it is (the official prompts hold no
/// `<image>`, so LLaVA's trainer drops the image: train it with `text_only: true` to follow that). Pairs of one
/// image listed twice keep one entry each, as the official list does. Returns the number of conversations.
pub fn prefs_to_sft(prefs: &Path, output: &Path) -> Result<usize> {
    crate::fsutil::check_output("--output", output, &[("--prefs", prefs)])?;
    let (pairs, _) = read_records::<PreferencePair>(prefs, false)?;
    let mut entries = Vec::with_capacity(pairs.len());
    for (number, pair) in pairs {
        let (prompt, chosen) =
            pair.chosen_turn().map_err(|why| Error::Input(format!("{}: record {number}: {why}", prefs.display())))?;
        let turn = |from: &str, value: &str| Turn { from: from.into(), value: value.into(), extra: Default::default() };
        entries.push(InstructionEntry {
            id: pair.image.replace("COCO_train2014_", "").replace(".jpg", "").into(),
            image: Some(pair.image.clone()),
            conversations: vec![turn(HUMAN, prompt), turn(GPT, chosen)],
            extra: Default::default(),
        });
    }
    let text = serde_json::to_vec(&entries).map_err(|e| Error::Input(format!("{}: {e}", output.display())))?;
    crate::fsutil::create_parent(output)?;
    crate::fsutil::write_atomic(output, &text)?;
    Ok(entries.len())
}

/// Resolves an image name against the image folder (the caller names the record when it is missing).
pub fn image_path(image_dir: &Path, name: &str) -> Result<PathBuf> {
    let path = image_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Input(format!("image {} not found", path.display())))
    }
}

/// Tokenises a conversation for training: `turns` are (user, assistant) pairs rendered with `template`; the
/// assistant tokens are scored. The image placeholder is expanded to `image_features` ids. Rows longer than
/// `max_length` keep the prompt and lose the end of the responses; the flag says whether that happened.
pub fn encode_conversation(
    tokenizer: &crate::text::TextTokenizer,
    template: crate::text::Template,
    turns: &[(String, String)],
    image_features: usize,
    max_length: usize,
) -> std::result::Result<(super::objective::EncodedRow, bool), String> {
    let mut messages: Vec<Option<&str>> = Vec::new();
    let mut spans = Vec::new();
    let encode = |msgs: &[Option<&str>]| tokenizer.encode(&template.render(msgs), true).map_err(|e| e.to_string());
    for (user, assistant) in turns {
        messages.push(Some(user));
        messages.push(None);
        let start = encode(&messages)?.len();
        messages.pop();
        messages.push(Some(assistant));
        spans.push((start, encode(&messages)?));
    }
    let ids = spans.last().map(|(_, ids)| ids.clone()).ok_or("no turns")?;
    let mut scored = vec![false; ids.len()];
    for (start, upto) in &spans {
        if upto.len() > ids.len() || upto[..] != ids[..upto.len()] {
            return Err("an assistant turn changes how the text before it tokenizes".into());
        }
        scored[*start..upto.len()].iter_mut().for_each(|s| *s = true);
    }
    let image_id = tokenizer.image_id;
    let (mut ids_out, mut scored_out) =
        (Vec::with_capacity(ids.len() + image_features), Vec::with_capacity(ids.len() + image_features));
    for (id, s) in ids.into_iter().zip(scored) {
        let copies = if id == image_id { image_features } else { 1 };
        ids_out.extend(std::iter::repeat_n(id, copies));
        scored_out.extend(std::iter::repeat_n(s, copies));
    }
    let first_scored = scored_out.iter().position(|&s| s).ok_or("no response tokens")?;
    if first_scored >= max_length {
        return Err(format!(
            "the prompt alone is {first_scored} tokens (image included), over max_length {max_length}"
        ));
    }
    let truncated = ids_out.len() > max_length;
    ids_out.truncate(max_length);
    scored_out.truncate(max_length);
    Ok((super::objective::EncodedRow { ids: ids_out, scored: scored_out }, truncated))
}

/// The image's size (height, width) from its header, without decoding it.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    let (w, h) = ::image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| Error::io(path, e))?
        .into_dimensions()
        .map_err(|e| Error::Input(format!("{}: cannot read the image header: {e}", path.display())))?;
    Ok((h, w))
}
