//! LLaVA-v1.6-Mistral: module paths mirror the llava-hf state-dict names.
pub mod attention;
pub mod clip;
pub mod config;
pub mod linear;
pub mod llava_next;
pub mod mistral;
pub mod projector;
pub mod tiny;
pub mod weights;

pub use config::LlavaConfig;
pub use llava_next::LlavaNext;
