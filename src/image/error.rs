//! What can go wrong reading an image, with the file named.
#[derive(thiserror::Error, Debug)]
pub enum ImageError {
    #[error("image {what}: file not found")]
    NotFound { what: String },
    #[error("image {what}: cannot read file: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("image {what}: file is empty (0 bytes)")]
    Empty { what: String },
    #[error("image {what}: not a recognised image format (supported: PNG, JPEG, GIF, BMP, TIFF, WebP)")]
    UnknownFormat { what: String },
    #[error("image {what}: {width}x{height} = {pixels} pixels exceeds the limit of {limit} pixels")]
    TooManyPixels { what: String, width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("image {what}: unsupported {format} variant: {detail}")]
    Unsupported { what: String, format: &'static str, detail: String },
    #[error("image {what}: corrupt or truncated {format} data: {detail}")]
    Corrupt { what: String, format: &'static str, detail: String },
}
