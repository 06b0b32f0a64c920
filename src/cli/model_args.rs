//! Flags shared by every command that loads a model.
use std::path::PathBuf;

use stic::generate::session::{ModelSource, ModelSpec};
use stic::image::Processing;
use stic::model::geometry::Geometry;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder: config.json, the tokenizer and *.safetensors (llava-hf or original LLaVA layout), or a hub
    /// id (`llava-hf/llava-v1.6-mistral-7b-hf`, `owner/name@revision`) found in the local Hugging Face cache.
    #[arg(long, value_parser = hub_path, required_unless_present = "random_weights")]
    pub model: Option<PathBuf>,
    /// Instead of --model: this geometry with random weights made on the device from --seed (0 where the command
    /// has none), nothing read or written; the shipped Mistral tokenizer (throughput checks).
    #[arg(long, value_name = "GEOMETRY", hide = true, conflicts_with = "model")]
    pub random_weights: Option<Geometry>,
    /// PEFT LoRA adapter folder (from stic, Python PEFT, or STIC's released adapters), or its hub id in the
    /// local Hugging Face cache.
    #[arg(long, value_parser = hub_path)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub processing: ProcessingArg,
    /// Weights' dtype; auto is bf16 on CUDA, f32 on CPU.
    #[arg(long, default_value = "auto", value_parser = super::choices::dtype())]
    pub dtype: String,
    /// cpu, cuda, cuda:N or auto (CUDA when there is a GPU).
    #[arg(long, default_value = "auto", value_parser = super::choices::device)]
    pub device: String,
}

/// A `--model`/`--adapter` value: a folder, or a hub id resolved through the local Hugging Face cache
/// (`HF_HUB_CACHE`, `HF_HOME`), without the network.
pub fn hub_path(text: &str) -> Result<PathBuf, String> {
    stic::hub_cache::resolve(text, |name| std::env::var(name).ok()).map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug, Clone)]
pub struct ProcessingArg {
    /// Whose image and prompt processing to follow: `llava` (haotian-liu/LLaVA's code, which made the paper's
    /// numbers: slow tokenizer, tokenizer_image_token, its anyres grid and unpad) or `transformers` (the
    /// LlavaNextProcessor). Default: llava for an original LLaVA checkpoint, transformers for llava-hf.
    #[arg(long, value_parser = super::choices::value_enum::<Processing>())]
    pub processing: Option<Processing>,
}

impl ModelArgs {
    /// The model these flags name; `seed` draws the weights of --random-weights.
    pub fn spec(&self, seed: u64) -> ModelSpec {
        ModelSpec {
            model: ModelSource::from_flags(self.model.clone(), self.random_weights, seed),
            adapter: self.adapter.clone(),
            processing: self.processing.processing,
            dtype: self.dtype.clone(),
            device: self.device.clone(),
        }
    }
}
