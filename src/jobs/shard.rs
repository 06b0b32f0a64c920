//! Splitting a generation job into shards: which positions of the input list a shard owns, the file it writes,
//! and the joining of the shards' files into the output one process writes.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use super::jsonl::{complete_records, settings_path, write_settings};
use super::JobError;
use crate::error::{Error, Result};
use crate::fsutil::{read_json, write_atomic};

/// One of `count` disjoint parts of a job's input list: the shard with index `i` owns the positions `p` with
/// `p % count == i`, so every position belongs to exactly one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Self, JobError> {
        Shard::checked(index, count)
            .map_err(|reason| JobError::InvalidShard { spec: format!("{index}/{count}"), reason: reason.into() })
    }

    fn checked(index: usize, count: usize) -> Result<Self, &'static str> {
        if count == 0 {
            Err("the shard count must be at least 1")
        } else if index >= count {
            Err("the shard index counts from 0 and must be below the shard count")
        } else {
            Ok(Shard { index, count })
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether the item at `position` of the input list belongs to this shard.
    pub fn owns(&self, position: usize) -> bool {
        position % self.count == self.index
    }
}

/// The whole list: shard 0 of 1.
impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl FromStr for Shard {
    type Err = JobError;

    /// Parses "I/N", e.g. "0/4".
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| JobError::InvalidShard { spec: spec.to_owned(), reason: reason.into() };
        let (index, count) = spec.split_once('/').ok_or_else(|| invalid("no '/'"))?;
        let number = |text: &str| text.trim().parse::<usize>().map_err(|_| invalid("I and N must be whole numbers"));
        Shard::checked(number(index)?, number(count)?).map_err(invalid)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The file a shard of a job writes for the job's output `path`: `path` itself for the whole list, else
/// `<stem>.shard-<I>-of-<N>.<extension>` beside it (e.g. `predictions.shard-0-of-2.jsonl`).
pub fn shard_path(path: &Path, shard: Shard) -> PathBuf {
    if shard.count == 1 {
        return path.to_owned();
    }
    let mut name = path.file_stem().unwrap_or_default().to_owned();
    name.push(format!(".shard-{}-of-{}", shard.index, shard.count));
    if let Some(extension) = path.extension() {
        name.push(".");
        name.push(extension);
    }
    path.with_file_name(name)
}

/// What [`merge_shards`] makes of a key of the input list that no shard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKeys {
    /// An error: a shard is unfinished (or the wrong files were given).
    Refuse,
    /// Left out, as a single process leaves out what it skipped or did not reach (`--limit`): for shards that
    /// are known to be complete.
    Omit,
}

/// Joins the shard outputs `inputs` into `output`, one record per key of `order` and in that order (the job's
/// input list). The lines are copied byte for byte; a torn last line of a shard counts as missing. Fails,
/// writing nothing, when a key is recorded twice, when one of `order` is missing (unless `missing` is
/// [`MissingKeys::Omit`]), when a shard holds a key that `order` lacks, or when the shards were made with
/// different settings. `output` is replaced atomically, after the shards' settings are recorded for it.
/// Returns the number of records written.
pub fn merge_shards(
    inputs: &[PathBuf],
    output: &Path,
    key: &str,
    order: &[String],
    missing: MissingKeys,
) -> Result<usize> {
    let mut ordered_keys = HashSet::with_capacity(order.len());
    if let Some(repeated) = order.iter().find(|k| !ordered_keys.insert(k.as_str())) {
        return Err(JobError::DuplicateInputKey { key: repeated.clone() }.into());
    }

    let settings = shared_settings(inputs)?;
    let shard_bytes =
        inputs.iter().map(|path| std::fs::read(path).map_err(|e| Error::io(path, e))).collect::<Result<Vec<_>>>()?;
    let mut lines_by_key: HashMap<String, &str> = HashMap::new();
    let mut duplicated = Vec::new();
    let mut unexpected = Vec::new();
    for (path, bytes) in inputs.iter().zip(&shard_bytes) {
        for record in complete_records(path, bytes, key)?.records {
            if !ordered_keys.contains(record.key.as_str()) {
                unexpected.push(record.key);
            } else if lines_by_key.insert(record.key.clone(), record.text).is_some() {
                duplicated.push(record.key);
            }
        }
    }
    let absent: Vec<String> = match missing {
        MissingKeys::Refuse => order.iter().filter(|k| !lines_by_key.contains_key(k.as_str())).cloned().collect(),
        MissingKeys::Omit => Vec::new(),
    };
    if !(duplicated.is_empty() && absent.is_empty() && unexpected.is_empty()) {
        return Err(JobError::ShardsDoNotMatchInput {
            output: output.to_owned(),
            duplicated,
            missing: absent,
            unexpected,
        }
        .into());
    }

    let mut merged = String::new();
    for line in order.iter().filter_map(|k| lines_by_key.get(k.as_str())) {
        merged.push_str(line);
        merged.push('\n');
    }
    match &settings {
        Some(settings) => write_settings(output, settings)?,
        None => match std::fs::remove_file(settings_path(output)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(settings_path(output), e)),
            _ => {}
        },
    }
    write_atomic(output, merged.as_bytes())?;
    Ok(lines_by_key.len())
}

/// The settings the shards `inputs` recorded (those that have a settings file), which must be the same.
pub(crate) fn shared_settings(inputs: &[PathBuf]) -> Result<Option<Value>> {
    let mut first: Option<(&PathBuf, Value)> = None;
    for path in inputs {
        let sidecar = settings_path(path);
        if !sidecar.exists() {
            continue;
        }
        let settings: Value = read_json(&sidecar)?;
        match &first {
            None => first = Some((path, settings)),
            Some((first_path, first_settings)) if *first_settings != settings => {
                return Err(JobError::ShardSettingsDiffer {
                    first: first_path.to_path_buf(),
                    other: path.clone(),
                    differences: crate::settings::differences(first_settings, &settings),
                }
                .into());
            }
            Some(_) => {}
        }
    }
    Ok(first.map(|(_, settings)| settings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::jsonl::tests::{images, lines, record, run_job};
    use crate::jobs::jsonl::ResumableJsonl;
    use serde_json::json;

    #[test]
    fn shards_partition_the_positions() {
        for count in 1..=5 {
            let shards: Vec<Shard> = (0..count).map(|index| Shard::new(index, count).unwrap()).collect();
            for position in 0..23 {
                assert_eq!(shards.iter().filter(|shard| shard.owns(position)).count(), 1, "{position} of {count}");
            }
        }
    }

    #[test]
    fn shards_parse_from_i_slash_n() {
        assert_eq!("2/4".parse::<Shard>().unwrap(), Shard::new(2, 4).unwrap());
        assert_eq!(Shard::new(2, 4).unwrap().to_string(), "2/4");
        assert_eq!(Shard::default(), "0/1".parse().unwrap());
        for (spec, reason) in [
            ("4/4", "must be below the shard count"),
            ("0/0", "at least 1"),
            ("1", "no '/'"),
            ("a/2", "whole numbers"),
            ("-1/2", "whole numbers"),
        ] {
            let error = spec.parse::<Shard>().unwrap_err().to_string();
            assert!(error.starts_with(&format!("invalid shard '{spec}': ")) && error.contains(reason), "{error}");
        }
    }

    #[test]
    fn merged_shards_equal_the_unsharded_output() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = images(10);
        let unsharded = dir.path().join("all.jsonl");
        run_job(&unsharded, &inputs, Shard::default(), usize::MAX);

        let shard_paths: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("shard{i}.jsonl"))).collect();
        for (index, path) in shard_paths.iter().enumerate().rev() {
            let shard = Shard::new(index, 3).unwrap();
            // Interrupted once, then resumed.
            run_job(path, &inputs, shard, 1);
            run_job(path, &inputs, shard, usize::MAX);
        }
        let merged = dir.path().join("merged.jsonl");
        assert_eq!(merge_shards(&shard_paths, &merged, "image", &inputs, MissingKeys::Refuse).unwrap(), 10);
        assert_eq!(std::fs::read(&merged).unwrap(), std::fs::read(&unsharded).unwrap());
    }

    #[test]
    fn merge_reports_duplicated_missing_and_unexpected_keys_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = images(4);
        let write = |name: &str, images: &[&str]| {
            let path = dir.path().join(name);
            std::fs::write(&path, images.iter().map(|image| format!("{}\n", record(image))).collect::<String>())
                .unwrap();
            path
        };
        let shard_a = write("a.jsonl", &["COCO_000.jpg", "COCO_001.jpg", "stray.jpg"]);
        let shard_b = write("b.jsonl", &["COCO_001.jpg", "COCO_002.jpg"]);
        let merged = dir.path().join("merged.jsonl");
        let error = merge_shards(&[shard_a.clone(), shard_b.clone()], &merged, "image", &inputs, MissingKeys::Refuse)
            .unwrap_err()
            .to_string();
        assert!(error.contains("1 duplicated, 1 missing, 1 not in the input list"), "{error}");
        assert!(
            error.contains("duplicated: COCO_001.jpg; missing: COCO_003.jpg; not in the input list: stray.jpg"),
            "{error}"
        );
        assert!(!merged.exists());

        // Omitting missing keys (complete shards that skipped one) still refuses duplicates and strays.
        let error = merge_shards(&[shard_a, shard_b.clone()], &merged, "image", &inputs, MissingKeys::Omit)
            .unwrap_err()
            .to_string();
        assert!(error.contains("1 duplicated, 0 missing, 1 not in the input list"), "{error}");
        let shard_c = write("c.jsonl", &["COCO_000.jpg"]);
        assert_eq!(merge_shards(&[shard_b, shard_c], &merged, "image", &inputs, MissingKeys::Omit).unwrap(), 3);
        let order: Vec<String> = lines(&merged).iter().map(|r| r["image"].as_str().unwrap().to_string()).collect();
        assert_eq!(order, ["COCO_000.jpg", "COCO_001.jpg", "COCO_002.jpg"]);

        let repeated_input = ["x".to_string(), "x".to_string()];
        let error = merge_shards(&[], &merged, "image", &repeated_input, MissingKeys::Omit).unwrap_err().to_string();
        assert!(error.contains("'x' more than once"), "{error}");
    }

    #[test]
    fn shard_files_are_named_after_the_output() {
        let shard = Shard::new(1, 4).unwrap();
        assert_eq!(shard_path(Path::new("out/prefs.jsonl"), shard), Path::new("out/prefs.shard-1-of-4.jsonl"));
        assert_eq!(shard_path(Path::new("prefs"), shard), Path::new("prefs.shard-1-of-4"));
        assert_eq!(shard_path(Path::new("out/prefs.jsonl"), Shard::default()), Path::new("out/prefs.jsonl"));
    }

    #[test]
    fn shards_of_different_settings_are_not_merged() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = images(2);
        let shards: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("s{i}.jsonl"))).collect();
        for (i, path) in shards.iter().enumerate() {
            let mut output = ResumableJsonl::open(path, "image", &json!({"seed": 40 + i})).unwrap();
            output.append(&record(&inputs[i])).unwrap();
        }
        let merged = dir.path().join("m.jsonl");
        let error = merge_shards(&shards, &merged, "image", &inputs, MissingKeys::Refuse).unwrap_err().to_string();
        assert!(error.contains("s0.jsonl and") && error.contains("seed (40 before, 41 now)"), "{error}");
        assert!(!merged.exists() && !settings_path(&merged).exists());

        write_settings(&shards[1], &json!({"seed": 40})).unwrap();
        merge_shards(&shards, &merged, "image", &inputs, MissingKeys::Refuse).unwrap();
        assert_eq!(read_json::<Value>(&settings_path(&merged)).unwrap(), json!({"seed": 40}));
    }
}
