//! Reading a benchmark's published files: the error type every loader returns and the small readers they share.
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum EvalDataError {
    #[error("{benchmark}: missing {}; {origin}", path.display())]
    MissingFile { benchmark: &'static str, path: PathBuf, origin: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}{}: invalid JSON: {source}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Json { path: PathBuf, line: Option<usize>, source: serde_json::Error },
    #[error("{}: invalid TSV: {source}", path.display())]
    Tsv { path: PathBuf, source: csv::Error },
    #[error("{}: not a readable parquet file ({error}); download it again", path.display())]
    Parquet { path: PathBuf, error: parquet::errors::ParquetError },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// `path` if it exists; otherwise the error naming it and where it comes from.
pub fn require(benchmark: &'static str, path: PathBuf, origin: &str) -> Result<PathBuf, EvalDataError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(EvalDataError::MissingFile { benchmark, path, origin: origin.to_string() })
    }
}

pub fn read_text(path: &Path) -> Result<String, EvalDataError> {
    std::fs::read_to_string(path).map_err(|source| EvalDataError::Io { path: path.to_path_buf(), source })
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, EvalDataError> {
    serde_json::from_str(&read_text(path)?).map_err(|source| EvalDataError::Json {
        path: path.to_path_buf(),
        line: None,
        source,
    })
}

pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, EvalDataError> {
    read_text(path)?
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|source| EvalDataError::Json {
                path: path.to_path_buf(),
                line: Some(i + 1),
                source,
            })
        })
        .collect()
}

pub fn invalid(path: &Path, message: impl Into<String>) -> EvalDataError {
    EvalDataError::Invalid { path: path.to_path_buf(), message: message.into() }
}

pub fn to_meta(meta: impl Serialize) -> Value {
    serde_json::to_value(meta).expect("meta structs hold only strings, numbers and lists")
}

/// Python's `str()` of a JSON scalar: strings as they are, numbers as written.
pub fn json_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}
