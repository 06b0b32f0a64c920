//! LLaVA-NeXT on a Mistral or Llama decoder: module paths mirror the llava-hf state-dict names.
pub mod attention;
pub mod clip;
pub mod config;
pub mod decoder;
pub mod geometry;
pub mod linear;
pub mod llava_next;
pub mod lora;
pub mod pickle;
pub mod projector;
pub mod tiny;
pub mod weights;

pub use config::LlavaConfig;
pub use llava_next::LlavaNext;
