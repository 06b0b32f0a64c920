//! One question of a benchmark, as every benchmark module loads it and the generation tasks answer it.
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageSource {
    Path(PathBuf),
    /// Encoded image file bytes (PNG/JPEG), as MMBench's TSV and the parquet releases embed them.
    Bytes(Vec<u8>),
    None,
}

impl ImageSource {
    /// The image as the evaluation reads it (`None` for text-only items); `item` names embedded bytes in errors.
    pub fn decode(&self, item: &str, max_pixels: u64) -> Result<Option<::image::RgbImage>, crate::image::ImageError> {
        match self {
            ImageSource::Path(path) => crate::image::load_image(path, max_pixels).map(Some),
            ImageSource::Bytes(bytes) => {
                crate::image::load_image_bytes(bytes, &format!("item {item}"), max_pixels).map(Some)
            }
            ImageSource::None => Ok(None),
        }
    }
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
