//! Crash-safe, resumable JSONL output for long generation jobs.
//!
//! Every record is one line, written with a single `write_all` and made durable with `fsync` before the next
//! one starts. A kill can therefore only leave the last line torn; [`ResumableJsonl::open`] cuts such a line
//! off and reports which keys are already done, so a rerun continues where the last one stopped. The settings
//! the records are made with are kept beside the output ([`settings_path`]); a rerun with other settings is
//! refused rather than mixing records of both into one file.
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

// `shard_path` and `Shard` are also reached here by the evaluation code, which imports them from this module.
use super::JobError;
use crate::error::{Error, Result};
use crate::fsutil::{open_locked, write_atomic, LockError};
use crate::fsutil::{read_json, without_bom};

/// The text of a key value: a string as is, a number as written in JSON; `None` for any other value.
pub fn key_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// The file beside a job's output `path` that holds the settings of its records: `<path>.settings.json`. A
/// side file rather than a header line keeps the output in the schema of the official data.
pub fn settings_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".settings.json");
    path.with_file_name(name)
}

pub(super) fn write_settings(path: &Path, settings: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(settings).expect("JSON values serialise") + "\n";
    write_atomic(&settings_path(path), text.as_bytes())
}

/// Checks `settings` against those recorded for the `records` records of `path`, or records them when there is
/// nothing to check them against yet. `Value::Null` checks nothing.
fn check_settings(path: &Path, records: usize, settings: &Value) -> Result<()> {
    if settings.is_null() {
        return Ok(());
    }
    let sidecar = settings_path(path);
    let recorded: Option<Value> = if sidecar.exists() { Some(read_json(&sidecar)?) } else { None };
    match recorded {
        Some(recorded) if recorded == *settings => Ok(()),
        Some(recorded) if records > 0 => Err(JobError::SettingsDiffer {
            path: path.to_owned(),
            records,
            differences: crate::settings::differences(&recorded, settings),
        }
        .into()),
        None if records > 0 => {
            eprintln!(
                "warning: {} has {records} records but no {}: taking them for records of the current settings",
                path.display(),
                sidecar.display()
            );
            write_settings(path, settings)
        }
        _ => write_settings(path, settings),
    }
}

/// Output file of a generation job, opened for appending records identified by `key_field`.
pub struct ResumableJsonl {
    path: PathBuf,
    // Holds an exclusive lock for as long as this value lives.
    file: File,
    key_field: String,
    done: HashSet<String>,
    len: u64,
    cut_torn_line: bool,
    /// Whether the file stays when it is dropped still empty (see [`keep`](Self::keep)).
    kept: bool,
}

impl ResumableJsonl {
    /// Opens (or creates) `path`, locks it against a second writer, cuts off a torn last line and collects the
    /// keys of the records already there. A last line is torn when it has no final newline or is not valid
    /// JSON; any other invalid line is an error, as is a record without `key_field`. The records there must
    /// have been made with `settings` (a JSON object of what changes the records: model, sampling, prompts…);
    /// the settings of a file without records are recorded ([`settings_path`]) before anything else is written.
    pub fn open(path: &Path, key_field: &str, settings: &Value) -> Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        let file = open_locked(path, &options).map_err(|error| match error {
            LockError::Held => Error::from(JobError::OutputLocked { path: path.to_owned() }),
            LockError::Io(e) => Error::io(path, e),
        })?;
        let mut output = ResumableJsonl {
            path: path.to_owned(),
            file,
            key_field: key_field.to_owned(),
            done: HashSet::new(),
            len: 0,
            cut_torn_line: false,
            kept: false,
        };
        let mut bytes = Vec::new();
        output.file.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
        output.len = bytes.len() as u64;
        let contents = complete_records(path, &bytes, key_field)?;
        output.cut_torn_line = contents.complete_len < bytes.len();
        if output.cut_torn_line {
            output
                .file
                .set_len(contents.complete_len as u64)
                .and_then(|()| output.file.sync_all())
                .map_err(|e| Error::io(path, e))?;
            output.len = contents.complete_len as u64;
        }
        check_settings(path, contents.records.len(), settings)?;
        output.done = contents.records.into_iter().map(|record| record.key).collect();
        Ok(output)
    }

    /// Keeps the file when it is dropped without records: the job ended well with nothing to write (every item
    /// skipped, or done elsewhere). Otherwise a file that holds nothing is removed with its settings, so that a
    /// job that fails before its first record leaves nothing behind.
    pub fn keep(&mut self) {
        self.kept = true;
    }

    pub fn is_done(&self, key: &str) -> bool {
        self.done.contains(key)
    }

    pub fn done_count(&self) -> usize {
        self.done.len()
    }

    /// Whether [`open`](Self::open) found and cut off a torn last line.
    pub fn cut_torn_line(&self) -> bool {
        self.cut_torn_line
    }

    /// Appends `record` as one line and waits until it is on disk. The record must carry the key field, and
    /// its key must not be recorded yet.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let unserializable = |source| JobError::UnserializableRecord { path: self.path.clone(), source };
        let mut line = serde_json::to_string(record).map_err(unserializable)?;
        let parsed: Value = serde_json::from_str(&line).map_err(unserializable)?;
        let key = record_key(&parsed, &self.key_field)
            .ok_or_else(|| JobError::RecordWithoutKey { path: self.path.clone(), key: self.key_field.clone() })?;
        if self.done.contains(&key) {
            return Err(JobError::AlreadyRecorded { path: self.path.clone(), key }.into());
        }
        line.push('\n');
        let written = self.file.write_all(line.as_bytes()).and_then(|()| self.file.sync_all());
        if let Err(e) = written {
            // A partial write must not stay in front of the next record: cut the file back (best effort; the next
            // open cuts it off anyway).
            let _ = self.file.set_len(self.len);
            return Err(Error::io(&self.path, e));
        }
        self.len += line.len() as u64;
        self.done.insert(key);
        Ok(())
    }
}

impl Drop for ResumableJsonl {
    fn drop(&mut self) {
        if !self.kept && self.len == 0 {
            // Still locked: a second process that opens the file now finds it gone and creates its own.
            let _ = std::fs::remove_file(settings_path(&self.path));
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn record_key(record: &Value, key_field: &str) -> Option<String> {
    record.get(key_field).and_then(key_text)
}

pub(super) struct KeyedLine<'a> {
    pub key: String,
    pub text: &'a str,
}

pub(super) struct CompleteRecords<'a> {
    pub records: Vec<KeyedLine<'a>>,
    /// Length of the file without its torn last line.
    complete_len: usize,
}

/// The records of a JSONL file written by [`ResumableJsonl`], without a torn last line. Blank lines are skipped.
pub(super) fn complete_records<'a>(
    path: &Path,
    bytes: &'a [u8],
    key_field: &str,
) -> Result<CompleteRecords<'a>, JobError> {
    let lines: Vec<&[u8]> = bytes.split_inclusive(|&byte| byte == b'\n').collect();
    let mut records = Vec::new();
    let mut next_line_start = 0;
    for (index, raw_line) in lines.iter().enumerate() {
        let line_number = index + 1;
        let line_start = next_line_start;
        next_line_start += raw_line.len();
        // Only the last piece can lack the newline: a torn write.
        let Some(line) = raw_line.strip_suffix(b"\n") else {
            return Ok(CompleteRecords { records, complete_len: line_start });
        };
        if line.trim_ascii().is_empty() {
            continue;
        }
        let parsed = line_text(path, line_number, line)
            .and_then(|text| Ok((text, parse_line::<Value>(path, line_number, text)?)));
        let (text, value) = match parsed {
            Ok(parsed) => parsed,
            Err(_) if line_number == lines.len() => return Ok(CompleteRecords { records, complete_len: line_start }),
            Err(error) => return Err(error),
        };
        let key = record_key(&value, key_field).ok_or_else(|| JobError::MissingKey {
            path: path.to_owned(),
            line: line_number,
            key: key_field.to_owned(),
        })?;
        records.push(KeyedLine { key, text });
    }
    Ok(CompleteRecords { records, complete_len: bytes.len() })
}

fn line_text<'a>(path: &Path, line_number: usize, line: &'a [u8]) -> Result<&'a str, JobError> {
    std::str::from_utf8(line).map_err(|e| JobError::InvalidJsonLine {
        path: path.to_owned(),
        line: line_number,
        reason: format!("not UTF-8 ({e})"),
    })
}

fn parse_line<T: DeserializeOwned>(path: &Path, line_number: usize, text: &str) -> Result<T, JobError> {
    serde_json::from_str(text).map_err(|e| JobError::InvalidJsonLine {
        path: path.to_owned(),
        line: line_number,
        reason: format!("invalid JSON ({e})"),
    })
}

/// Reads a whole JSONL file strictly: every non-blank line must be a valid `T`; errors name the file and line.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut records = Vec::new();
    for (index, line) in without_bom(&bytes).split(|&byte| byte == b'\n').enumerate() {
        if !line.trim_ascii().is_empty() {
            records.push(parse_line(path, index + 1, line_text(path, index + 1, line)?)?);
        }
    }
    Ok(records)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::jobs::shard::Shard;
    use serde_json::json;

    pub(crate) fn record(image: &str) -> Value {
        json!({"image": image, "description": format!("a photo called {image}")})
    }

    pub(crate) fn lines(path: &Path) -> Vec<Value> {
        read_jsonl(path).unwrap()
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_the_job_continues_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let complete = format!("{}\n{}\n", record("a.jpg"), record("b.jpg"));
        std::fs::write(&path, format!("{complete}{{\"image\": \"c.jpg\", \"descr")).unwrap();

        let mut output = ResumableJsonl::open(&path, "image", &Value::Null).unwrap();
        assert!(output.cut_torn_line());
        assert_eq!(output.done_count(), 2);
        assert!(output.is_done("a.jpg") && output.is_done("b.jpg") && !output.is_done("c.jpg"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), complete);

        output.append(&record("c.jpg")).unwrap();
        assert_eq!(lines(&path), [record("a.jpg"), record("b.jpg"), record("c.jpg")]);
    }

    #[test]
    fn a_last_line_of_garbage_is_cut_off_but_garbage_before_it_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let first = format!("{}\n", record("a.jpg"));
        std::fs::write(&path, format!("{first}\0\0\0\n")).unwrap();
        let output = ResumableJsonl::open(&path, "image", &Value::Null).unwrap();
        assert!(output.cut_torn_line());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        drop(output);

        std::fs::write(&path, format!("{first}not json\n{}\n", record("b.jpg"))).unwrap();
        let error = ResumableJsonl::open(&path, "image", &Value::Null).err().unwrap().to_string();
        assert!(error.contains("out.jsonl, line 2: invalid JSON"), "{error}");
    }

    #[test]
    fn records_without_the_key_field_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"id\": 1}\n{\"image\": \"b.jpg\"}\n").unwrap();
        let error = ResumableJsonl::open(&path, "image", &Value::Null).err().unwrap().to_string();
        assert!(error.contains("line 1: the record has no string or number field 'image'"), "{error}");

        std::fs::write(&path, "").unwrap();
        let mut output = ResumableJsonl::open(&path, "image", &Value::Null).unwrap();
        assert!(output.append(&json!({"id": 3})).is_err());
        output.append(&record("a.jpg")).unwrap();
        let error = output.append(&record("a.jpg")).unwrap_err().to_string();
        assert!(error.contains("'a.jpg' is already recorded"), "{error}");
        assert_eq!(lines(&path), [record("a.jpg")]);
    }

    #[test]
    fn numeric_keys_are_matched_by_their_json_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"id\": 17, \"x\": 1}\n").unwrap();
        assert!(ResumableJsonl::open(&path, "id", &Value::Null).unwrap().is_done("17"));
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let first = ResumableJsonl::open(&path, "image", &Value::Null).unwrap();
        let error = ResumableJsonl::open(&path, "image", &Value::Null).err().unwrap().to_string();
        assert!(error.contains("being written by another process"), "{error}");
        drop(first);
        ResumableJsonl::open(&path, "image", &Value::Null).unwrap();
    }

    /// A generation job over `inputs` that stops (as if killed) after `stop_after` new records.
    pub(crate) fn run_job(path: &Path, inputs: &[String], shard: Shard, stop_after: usize) -> usize {
        let mut output = ResumableJsonl::open(path, "image", &Value::Null).unwrap();
        let mut generated = 0;
        for (position, image) in inputs.iter().enumerate() {
            if !shard.owns(position) || output.is_done(image) {
                continue;
            }
            if generated == stop_after {
                break;
            }
            output.append(&record(image)).unwrap();
            generated += 1;
        }
        generated
    }

    pub(crate) fn images(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("COCO_{i:03}.jpg")).collect()
    }

    #[test]
    fn a_resumed_job_skips_what_is_done_and_generates_everything_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let inputs = images(7);
        assert_eq!(run_job(&path, &inputs, Shard::default(), 3), 3);
        assert_eq!(run_job(&path, &inputs, Shard::default(), usize::MAX), 4);
        assert_eq!(run_job(&path, &inputs, Shard::default(), usize::MAX), 0);
        let expected: Vec<Value> = inputs.iter().map(|image| record(image)).collect();
        assert_eq!(lines(&path), expected);
    }

    #[test]
    fn a_rerun_with_other_settings_is_refused_and_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.jsonl");
        let settings = json!({"model": "/models/a", "seed": 42, "temperature": 0.2});
        let mut output = ResumableJsonl::open(&path, "image", &settings).unwrap();
        let recorded: Value = read_json(&dir.path().join("prefs.jsonl.settings.json")).unwrap();
        assert_eq!(recorded, settings, "recorded before the first record");
        output.append(&record("a.jpg")).unwrap();
        drop(output);

        ResumableJsonl::open(&path, "image", &settings).unwrap();
        let other = json!({"model": "/models/b", "seed": 7, "temperature": 0.2});
        let error = ResumableJsonl::open(&path, "image", &other).err().unwrap().to_string();
        assert!(error.contains("prefs.jsonl holds 1 record(s) made with other settings"), "{error}");
        assert!(error.contains("model (\"/models/a\" before, \"/models/b\" now), seed (42 before, 7 now)"), "{error}");
        assert_eq!(lines(&path), [record("a.jpg")]);

        // Records without a settings file (an older stic) are taken for records of the current settings.
        std::fs::remove_file(settings_path(&path)).unwrap();
        ResumableJsonl::open(&path, "image", &other).unwrap();
        assert_eq!(read_json::<Value>(&settings_path(&path)).unwrap(), other);
    }

    #[test]
    fn an_output_left_without_records_is_removed_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        drop(ResumableJsonl::open(&path, "id", &json!({"seed": 1})).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a failed job leaves nothing");
        let mut output = ResumableJsonl::open(&path, "id", &json!({"seed": 1})).unwrap();
        output.keep();
        drop(output);
        assert!(path.exists() && settings_path(&path).exists(), "a job that wrote nothing, and ended well");
    }

    #[test]
    fn a_bom_before_the_first_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, format!("\u{feff}{}\n", record("a.jpg"))).unwrap();
        assert_eq!(lines(&path), [record("a.jpg")]);
    }

    #[test]
    fn strict_reading_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("descriptions.jsonl");
        std::fs::write(&path, format!("{}\n\n{{\"image\": \n", record("a.jpg"))).unwrap();
        let error = read_jsonl::<Value>(&path).unwrap_err().to_string();
        assert!(error.contains("descriptions.jsonl, line 3: invalid JSON"), "{error}");
    }
}
