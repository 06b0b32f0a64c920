//! Resumable, sharded JSONL jobs: the output file a generation job appends to and resumes from (`jsonl`), the
//! shards of its input list, their files and their joining (`shard`), the split of the list across torchrun
//! ranks (`sharding`), and the loop that runs a job's items through the generation engine (`job`).
//!
//! Functions that touch files return the crate's [`crate::Error`] (I/O errors name the path); what a job finds
//! wrong with its files or flags is a [`JobError`].
pub mod job;
pub mod jsonl;
pub mod shard;
pub mod sharding;

use std::path::PathBuf;

/// How many keys an error message lists before it summarises the rest.
const KEYS_SHOWN: usize = 10;

#[derive(thiserror::Error, Debug)]
pub enum JobError {
    #[error("invalid shard '{spec}': {reason}; write it as I/N with 0 <= I < N, e.g. 0/4 for the first of four")]
    InvalidShard { spec: String, reason: String },

    #[error("{path}, line {line}: {reason}; fix or remove that line")]
    InvalidJsonLine { path: PathBuf, line: usize, reason: String },

    #[error("{path}, line {line}: the record has no string or number field '{key}' to identify it")]
    MissingKey { path: PathBuf, line: usize, key: String },

    #[error("{path}: the record to append has no string or number field '{key}' to identify it")]
    RecordWithoutKey { path: PathBuf, key: String },

    #[error("{path}: could not serialize the record as JSON: {source}")]
    UnserializableRecord { path: PathBuf, source: serde_json::Error },

    #[error("{path}: '{key}' is already recorded; check is_done before generating it again")]
    AlreadyRecorded { path: PathBuf, key: String },

    #[error("{path} is being written by another process; run one job per shard file")]
    OutputLocked { path: PathBuf },

    #[error(
        "{path} holds {records} record(s) made with other settings: {}; rerun with the settings it was made with to \
         continue it, or write to a new output",
        differences.join(", ")
    )]
    SettingsDiffer { path: PathBuf, records: usize, differences: Vec<String> },

    #[error(
        "cannot merge {first} and {other}: their records were made with other settings: {}; merge the shards of \
         one run",
        differences.join(", ")
    )]
    ShardSettingsDiffer { first: PathBuf, other: PathBuf, differences: Vec<String> },

    #[error(
        "the input list has '{key}' more than once, so its records cannot be told apart; \
         key the job by a unique field (e.g. id)"
    )]
    DuplicateInputKey { key: String },

    #[error(
        "cannot merge into {output}: {} duplicated, {} missing, {} not in the input list{}{}{}; \
         finish or rerun the shards that lack records and remove stray ones, then merge again",
        duplicated.len(), missing.len(), unexpected.len(),
        key_list("duplicated", duplicated), key_list("missing", missing), key_list("not in the input list", unexpected)
    )]
    ShardsDoNotMatchInput { output: PathBuf, duplicated: Vec<String>, missing: Vec<String>, unexpected: Vec<String> },
}

/// "; missing: a, b, c …and 12 more" (empty when there are no keys).
fn key_list(label: &str, keys: &[String]) -> String {
    if keys.is_empty() {
        return String::new();
    }
    let shown = keys.iter().take(KEYS_SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
    match keys.len().saturating_sub(KEYS_SHOWN) {
        0 => format!("; {label}: {shown}"),
        more => format!("; {label}: {shown} …and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lists_are_cut_after_ten_keys() {
        let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
        assert_eq!(key_list("missing", &keys), "; missing: k0, k1, k2, k3, k4, k5, k6, k7, k8, k9 …and 2 more");
        assert_eq!(key_list("missing", &keys[..2]), "; missing: k0, k1");
        assert_eq!(key_list("missing", &[]), "");
    }
}
