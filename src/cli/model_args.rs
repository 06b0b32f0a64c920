//! Flags shared by every command that loads a model.
use std::path::PathBuf;

use stic::generate::session::ModelSpec;
use stic::image::Processing;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder: config.json, the tokenizer and *.safetensors (llava-hf or original LLaVA layout), or a hub
    /// id (`llava-hf/llava-v1.6-mistral-7b-hf`, `owner/name@revision`) found in the local Hugging Face cache.
    #[arg(long, value_parser = hub_path)]
    pub model: PathBuf,
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
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            processing: self.processing.processing,
            dtype: self.dtype.clone(),
            device: self.device.clone(),
        }
    }
}
