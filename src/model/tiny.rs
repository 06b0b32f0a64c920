//! `stic init-tiny`: a small random LLaVA-NeXT-Mistral checkpoint in llava-hf layout, for demos and tests.
use std::path::Path;
use tch::{Device, Kind};

use super::config::{DecoderFamily, TextConfig, VisionConfig};
use super::geometry::{llava_next_mistral, random_tensors};
use super::weights::save_safetensors;
use super::LlavaConfig;
use crate::error::Result;
use crate::fsutil::{create_dir, write_atomic, write_dir_atomic};

pub const TOKENIZER_FILES: [(&str, &[u8]); 3] = [
    ("tokenizer.json", include_bytes!("../../third_party/mistral-7b-tokenizer/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../third_party/mistral-7b-tokenizer/tokenizer_config.json")),
    ("special_tokens_map.json", include_bytes!("../../third_party/mistral-7b-tokenizer/special_tokens_map.json")),
];

/// LLaVA-v1.6-Mistral's geometry (336-pixel tiles of 14-pixel patches, anyres pinpoints, GQA 4:2, RoPE theta 1e6)
/// at toy width and depth.
pub fn tiny_config() -> LlavaConfig {
    let text = TextConfig {
        family: DecoderFamily::Mistral,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: Some(16),
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        sliding_window: None,
        vocab_size: 32002,
        max_position_embeddings: 8192,
        hidden_act: "silu".into(),
        tie_word_embeddings: false,
    };
    let vision = VisionConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        image_size: 336,
        patch_size: 14,
        layer_norm_eps: 1e-5,
        hidden_act: "quick_gelu".into(),
    };
    llava_next_mistral(text, vision)
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    write_atomic(path, text.as_bytes())
}

/// Writes the llava-hf config.json and processor configs of `cfg` to `dir`.
pub fn write_config_files(dir: &Path, cfg: &LlavaConfig) -> Result<()> {
    create_dir(dir)?;
    write_json(&dir.join("config.json"), &cfg.to_hf_json())?;
    for (name, value) in cfg.processor_json() {
        write_json(&dir.join(name), &value)?;
    }
    Ok(())
}

/// Writes config.json, the processor configs and the shipped tokenizer to `dir`.
pub fn write_model_files(dir: &Path, cfg: &LlavaConfig) -> Result<()> {
    write_config_files(dir, cfg)?;
    for (name, bytes) in TOKENIZER_FILES {
        write_atomic(&dir.join(name), bytes)?;
    }
    Ok(())
}

/// Writes a tiny model with random weights (seeded) to `dir`, all files or none (a full disk leaves no model
/// folder without weights).
pub fn write_tiny_model(dir: &Path, seed: i64) -> Result<()> {
    write_dir_atomic(dir, |staging| write_random_weights(staging, seed))
}

fn write_random_weights(dir: &Path, seed: i64) -> Result<()> {
    let cfg = tiny_config();
    write_model_files(dir, &cfg)?;
    tch::manual_seed(seed);
    save_safetensors(&dir.join("model.safetensors"), &random_tensors(&cfg, Kind::Float, Device::Cpu))
}
