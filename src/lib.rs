//! STIC (Self-Training on Image Comprehension) for LLaVA models, on libtorch.
//!
//! The rooms follow the data: an image (`image`) and a prompt (`text`) become features and tokens the model
//! (`model`, LoRA layers included) turns into log-probs; `generate` decodes from it, `train` turns log-probs into
//! a loss, and `adapter` writes what training learnt. The STIC method (`method`) runs as resumable JSONL jobs
//! (`jobs`), `eval` scores the benchmarks, and `reproduce` runs the paper end to end on top of them all.
pub mod adapter;
pub mod dist;
pub mod error;
pub mod eval;
pub mod fsutil;
pub mod generate;
pub mod hub_cache;
pub mod image;
pub mod jobs;
pub mod method;
pub mod model;
pub mod plot;
pub mod progress;
pub mod reproduce;
pub mod settings;
pub mod summary;
pub mod text;
pub mod train;

pub use error::{Error, Result};
