//! One question of a benchmark, as every benchmark module loads it and the generation tasks answer it.
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Path(PathBuf),
    /// Encoded image file bytes (PNG/JPEG), as MMBench's TSV and the parquet releases embed them.
    Bytes(Vec<u8>),
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    pub id: String,
    pub image: ImageSource,
    /// The user prompt without the `<image>` token, as the official evaluation script builds it.
    pub question: String,
    /// What the benchmark's scorer needs: its module's `*Meta` struct, as JSON.
    pub meta: Value,
}

impl EvalItem {
    pub fn meta_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.meta)
    }
}
