//! STIC stage 2 data: the stage-1 model's description of each image is put into the first human turn of
//! LLaVA-format instruction data, as the official `add_des_to_data.py` does after `generate_des_stage2.py`.
//!
//! The question `"<image>\n{question}"` becomes `"<image>\nImage description:\n{description}\n\n{question}"`.
//! When the text does not start with `"<image>\n"`, the description block goes in front of the whole text and
//! `<image>` stays where it was. (The official script inserts the block after every `"<image>\n"`, wherever it
//! is in the text.)
//!
//! Descriptions are matched to entries by `id`; the official script matched them by position.
use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::MethodError;
use crate::error::Result;
use crate::fsutil::read_json;
use crate::jobs::jsonl::{key_text, read_jsonl};

pub const HUMAN: &str = "human";
pub const GPT: &str = "gpt";
const IMAGE_TOKEN_LINE: &str = "<image>\n";

/// One sample of LLaVA instruction data. Fields other than these are kept as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstructionEntry {
    /// A string in LLaVA's data, a number in some derived sets.
    pub id: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub conversations: Vec<Turn>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl InstructionEntry {
    /// The (human, gpt) turn pairs of the conversation, in order.
    pub fn training_turns(&self) -> std::result::Result<Vec<(String, String)>, String> {
        let turns = &self.conversations;
        if turns.is_empty() || !turns.len().is_multiple_of(2) {
            return Err(format!("entry {}: {} turns; expected human/gpt pairs", self.id_text(), turns.len()));
        }
        turns
            .chunks(2)
            .enumerate()
            .map(|(i, pair)| match (pair[0].from.as_str(), pair[1].from.as_str()) {
                (HUMAN, GPT) => Ok((pair[0].value.clone(), pair[1].value.clone())),
                (a, b) => Err(format!(
                    "entry {}: turns {} and {} are '{a}' and '{b}', expected human then gpt",
                    self.id_text(),
                    2 * i,
                    2 * i + 1
                )),
            })
            .collect()
    }

    /// The id as text, for matching and messages.
    pub fn id_text(&self) -> String {
        id_text(&self.id)
    }
}

fn id_text(id: &Value) -> String {
    key_text(id).unwrap_or_else(|| id.to_string())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// [`HUMAN`] or [`GPT`].
    pub from: String,
    pub value: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One line of the descriptions file written by the stage-2 description job.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImageDescription {
    pub id: Value,
    #[serde(default)]
    pub image: Option<String>,
    pub description: String,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct InfusionReport {
    /// Entries whose first human turn got a description.
    pub infused: usize,
    /// Text-only entries, left as they are.
    pub without_image: usize,
    /// Ids of entries with an image but no description, left as they are.
    pub missing_description: Vec<String>,
}

/// Checks that every turn is from [`HUMAN`] or [`GPT`].
pub fn validate_conversations(entries: &[InstructionEntry]) -> Result<(), MethodError> {
    for entry in entries {
        if let Some((turn, bad)) =
            entry.conversations.iter().enumerate().find(|(_, t)| t.from != HUMAN && t.from != GPT)
        {
            return Err(MethodError::UnknownSpeaker { entry_id: entry.id_text(), turn, from: bad.from.clone() });
        }
    }
    Ok(())
}

/// Puts each entry's description into its first human turn (see the module documentation). Entries without an
/// image, or without a description, are returned unchanged and listed in the report.
pub fn infuse_descriptions(
    mut entries: Vec<InstructionEntry>,
    descriptions: &HashMap<String, ImageDescription>,
) -> Result<(Vec<InstructionEntry>, InfusionReport), MethodError> {
    let mut report = InfusionReport::default();
    for entry in &mut entries {
        let Some(image) = &entry.image else {
            report.without_image += 1;
            continue;
        };
        let entry_id = entry.id_text();
        let Some(description) = descriptions.get(&entry_id) else {
            report.missing_description.push(entry_id);
            continue;
        };
        if let Some(described_image) = description.image.as_ref().filter(|described| *described != image) {
            return Err(MethodError::DescriptionImageMismatch {
                entry_id,
                entry_image: image.clone(),
                description_image: described_image.clone(),
            });
        }
        let question = entry
            .conversations
            .iter_mut()
            .find(|turn| turn.from == HUMAN)
            .ok_or(MethodError::NoHumanTurn { entry_id })?;
        question.value = with_description(&question.value, &description.description);
        report.infused += 1;
    }
    Ok((entries, report))
}

/// The question with the description block in front (after a leading `"<image>\n"`); DaR evaluation
/// (describe, then answer) builds its prompt the same way.
pub fn with_description(question: &str, description: &str) -> String {
    let block = format!("Image description:\n{description}\n\n");
    match question.strip_prefix(IMAGE_TOKEN_LINE) {
        Some(rest) => format!("{IMAGE_TOKEN_LINE}{block}{rest}"),
        None => format!("{block}{question}"),
    }
}

/// Checks that every entry has a string or number id: the key its description and records are stored under.
fn validate_ids(path: &Path, entries: &[InstructionEntry]) -> Result<(), MethodError> {
    match entries.iter().position(|entry| key_text(&entry.id).is_none()) {
        Some(index) => Err(MethodError::EntryWithoutId {
            path: path.to_owned(),
            entry: index + 1,
            id: entries[index].id.to_string(),
        }),
        None => Ok(()),
    }
}

/// Checks that no two entries with an image share an id unless they share the image too: their descriptions
/// are matched to them by id.
pub fn validate_image_ids(path: &Path, entries: &[InstructionEntry]) -> Result<(), MethodError> {
    let mut first_with_id: HashMap<String, (usize, &str)> = HashMap::new();
    for (index, entry) in entries.iter().enumerate() {
        let Some(image) = entry.image.as_deref() else { continue };
        let (first, first_image) = *first_with_id.entry(entry.id_text()).or_insert((index, image));
        if first_image != image {
            return Err(MethodError::SharedEntryId {
                path: path.to_owned(),
                entry_id: entry.id_text(),
                first: first + 1,
                second: index + 1,
            });
        }
    }
    Ok(())
}

/// Reads LLaVA instruction data (a JSON list) and validates its ids and conversations.
pub fn load_instruction_data(path: &Path) -> Result<Vec<InstructionEntry>> {
    let entries: Vec<InstructionEntry> = read_json(path)?;
    validate_ids(path, &entries)?;
    validate_conversations(&entries)?;
    Ok(entries)
}

/// Reads a descriptions JSONL file, keyed by entry id; an id described twice is an error.
pub fn load_descriptions(path: &Path) -> Result<HashMap<String, ImageDescription>> {
    let mut by_id = HashMap::new();
    for description in read_jsonl::<ImageDescription>(path)? {
        let entry_id = id_text(&description.id);
        if by_id.insert(entry_id.clone(), description).is_some() {
            return Err(MethodError::DuplicateDescription { path: path.to_owned(), entry_id }.into());
        }
    }
    Ok(by_id)
}

/// [`infuse_descriptions`] on the instruction data file `data` and the descriptions file `descriptions`.
pub fn infuse_files(data: &Path, descriptions: &Path) -> Result<(Vec<InstructionEntry>, InfusionReport)> {
    let entries = load_instruction_data(data)?;
    validate_image_ids(data, &entries)?;
    let descriptions = load_descriptions(descriptions)?;
    Ok(infuse_descriptions(entries, &descriptions)?)
}

/// `stic infuse`: [`infuse_files`] written to `output` (LLaVA format).
pub fn infuse_into(data: &Path, descriptions: &Path, output: &Path) -> Result<InfusionReport> {
    crate::fsutil::check_output("--output", output, &[("--data", data), ("--descriptions", descriptions)])?;
    let (entries, report) = infuse_files(data, descriptions)?;
    crate::fsutil::create_parent(output)?;
    save_instruction_data(output, &entries)?;
    Ok(report)
}

/// Writes instruction data as indented JSON, atomically.
pub fn save_instruction_data(path: &Path, entries: &[InstructionEntry]) -> Result<()> {
    let mut json = serde_json::to_string_pretty(entries)
        .map_err(|source| crate::jobs::JobError::UnserializableRecord { path: path.to_owned(), source })?;
    json.push('\n');
    crate::fsutil::write_atomic(path, json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DATA: &str = r#"[
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "ocr_17", "image": "ocr_vqa/images/17.jpg", "model": "", "conversations": [
            {"from": "human", "value": "Who wrote this book?\n<image>"},
            {"from": "gpt", "value": "Jane Doe"}]},
        {"id": 42, "conversations": [
            {"from": "human", "value": "Write a haiku."},
            {"from": "gpt", "value": "..."}]},
        {"id": "vg_5", "image": "vg/VG_100K/5.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is on the table?"},
            {"from": "gpt", "value": "A vase."}]}
    ]"#;

    const DESCRIPTIONS: &str = concat!(
        r#"{"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "description": "A red and white bus."}"#,
        "\n",
        r#"{"id": "ocr_17", "image": "ocr_vqa/images/17.jpg", "description": "A book cover.", "prompt": "p"}"#,
        "\n",
        r#"{"id": 42, "description": "unused: the entry has no image"}"#,
        "\n",
    );

    fn write_inputs(dir: &Path, data: &str, descriptions: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let (data_path, descriptions_path) = (dir.join("data.json"), dir.join("descriptions.jsonl"));
        std::fs::write(&data_path, data).unwrap();
        std::fs::write(&descriptions_path, descriptions).unwrap();
        (data_path, descriptions_path)
    }

    #[test]
    fn descriptions_go_into_the_first_human_turn() {
        let dir = tempfile::tempdir().unwrap();
        let (data, descriptions) = write_inputs(dir.path(), DATA, DESCRIPTIONS);
        let (entries, report) = infuse_files(&data, &descriptions).unwrap();

        let expected = json!([
            {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
                {"from": "human", "value": "<image>\nImage description:\nA red and white bus.\n\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
            {"id": "ocr_17", "image": "ocr_vqa/images/17.jpg", "model": "", "conversations": [
                {"from": "human", "value": "Image description:\nA book cover.\n\nWho wrote this book?\n<image>"},
                {"from": "gpt", "value": "Jane Doe"}]},
            {"id": 42, "conversations": [
                {"from": "human", "value": "Write a haiku."},
                {"from": "gpt", "value": "..."}]},
            {"id": "vg_5", "image": "vg/VG_100K/5.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat is on the table?"},
                {"from": "gpt", "value": "A vase."}]}
        ]);
        assert_eq!(serde_json::to_value(&entries).unwrap(), expected);
        assert_eq!(report, InfusionReport { infused: 2, without_image: 1, missing_description: vec!["vg_5".into()] });

        let saved = dir.path().join("infused.json");
        save_instruction_data(&saved, &entries).unwrap();
        assert_eq!(load_instruction_data(&saved).unwrap(), entries);
    }

    #[test]
    fn the_block_matches_the_official_format() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/third_party/stic/prompts.json");
        let prompts: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let format = prompts["description_infusion_format"].as_str().unwrap();
        let expected = format.replace("{description}", "D").replace("{question}", "Q?");
        assert_eq!(with_description("Q?", "D"), expected);
        assert_eq!(with_description("<image>\nQ?", "D"), format!("<image>\n{expected}"));
    }

    #[test]
    fn an_unknown_speaker_is_named_with_entry_and_turn() {
        let dir = tempfile::tempdir().unwrap();
        let data =
            DATA.replace(r#"{"from": "gpt", "value": "Jane Doe"}"#, r#"{"from": "assistant", "value": "Jane Doe"}"#);
        let (data, descriptions) = write_inputs(dir.path(), &data, DESCRIPTIONS);
        let error = infuse_files(&data, &descriptions).unwrap_err().to_string();
        assert_eq!(error, "entry ocr_17: turn 1 is from 'assistant', expected 'human' or 'gpt'; fix the data file");
    }

    #[test]
    fn invalid_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (data, descriptions) = write_inputs(dir.path(), "[{\"id\": 1,", DESCRIPTIONS);
        let error = infuse_files(&data, &descriptions).unwrap_err().to_string();
        assert!(error.contains("data.json: invalid JSON"), "{error}");

        let broken_second_line = DESCRIPTIONS.replacen("\"ocr_17\"", "ocr_17", 1);
        let (data, descriptions) = write_inputs(dir.path(), DATA, &broken_second_line);
        let error = infuse_files(&data, &descriptions).unwrap_err().to_string();
        assert!(error.contains("descriptions.jsonl, line 2: invalid JSON"), "{error}");
    }

    #[test]
    fn descriptions_of_other_data_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other_image = DESCRIPTIONS.replace("ocr_vqa/images/17.jpg", "ocr_vqa/images/18.jpg");
        let (data, descriptions) = write_inputs(dir.path(), DATA, &other_image);
        let error = infuse_files(&data, &descriptions).unwrap_err().to_string();
        assert!(error.contains("entry ocr_17 is of image 'ocr_vqa/images/18.jpg'"), "{error}");

        let twice = format!("{DESCRIPTIONS}{}\n", DESCRIPTIONS.lines().next().unwrap());
        let (data, descriptions) = write_inputs(dir.path(), DATA, &twice);
        let error = infuse_files(&data, &descriptions).unwrap_err().to_string();
        assert!(error.contains("more than one description for entry 000000033471"), "{error}");
    }

    #[test]
    fn ids_must_be_keys_and_name_their_entry() {
        let dir = tempfile::tempdir().unwrap();
        let null_id = DATA.replacen(r#""id": "ocr_17""#, r#""id": null"#, 1);
        let (data, descriptions) = write_inputs(dir.path(), &null_id, DESCRIPTIONS);
        let error = infuse_files(&data, &descriptions).unwrap_err().to_string();
        assert!(error.contains("data.json, entry 2: the id null is not a string or a number"), "{error}");

        let shared = DATA.replacen(r#""id": "vg_5""#, r#""id": "ocr_17""#, 1);
        let (data, descriptions) = write_inputs(dir.path(), &shared, DESCRIPTIONS);
        let error = infuse_files(&data, &descriptions).unwrap_err().to_string();
        assert!(error.contains("data.json: entries 2 and 4 have the id ocr_17 but different images"), "{error}");
    }

    #[test]
    fn an_entry_with_an_image_needs_a_human_turn() {
        let entry: InstructionEntry = serde_json::from_value(json!(
            {"id": "x", "image": "x.jpg", "conversations": [{"from": "gpt", "value": "hi"}]}
        ))
        .unwrap();
        let descriptions = HashMap::from([(
            "x".to_string(),
            ImageDescription { id: json!("x"), image: None, description: "d".into() },
        )]);
        let error = infuse_descriptions(vec![entry], &descriptions).unwrap_err().to_string();
        assert!(error.starts_with("entry x has an image but no human turn"), "{error}");
    }
}
