//! STIC (Self-Training on Image Comprehension) for LLaVA-v1.6-Mistral, on libtorch.
pub mod dist;
pub mod error;
pub mod fsutil;
pub mod generate;
pub mod hub_cache;
pub mod image;
pub mod lora;
pub mod merge;
pub mod model;
pub mod plot;
pub mod progress;
pub mod score;
pub mod session;
pub mod settings;
pub mod stic;
pub mod summary;
pub mod text;

pub use error::{Error, Result};
pub mod train;
pub mod eval;
