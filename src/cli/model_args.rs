//! Flags shared by every command that loads a model.
use std::path::PathBuf;

use stic::image::Processing;
use stic::session::{parse_device, parse_dtype, Session};
use stic::stic::sharding::Sharding;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder: config.json, the tokenizer and *.safetensors (llava-hf or original LLaVA layout).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter folder (from stic, Python PEFT, or STIC's released adapters).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub processing: ProcessingArg,
    /// f32, bf16, f16 or auto (bf16 on CUDA, f32 on CPU).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ProcessingArg {
    /// Whose image and prompt processing to follow: `llava` (haotian-liu/LLaVA's code, which made the paper's
    /// numbers: slow tokenizer, tokenizer_image_token, its anyres grid and unpad) or `transformers` (the
    /// LlavaNextProcessor). Default: llava for an original LLaVA checkpoint, transformers for llava-hf.
    #[arg(long, value_parser = clap::value_parser!(Processing))]
    pub processing: Option<Processing>,
}

impl ModelArgs {
    pub fn load(&self) -> stic::Result<Session> {
        self.load_on(parse_device(&self.device)?)
    }

    /// Loads onto the device of this process's share of a job (its own GPU under torchrun).
    pub fn load_for(&self, sharding: &Sharding) -> stic::Result<Session> {
        self.load_on(sharding.device(parse_device(&self.device)?))
    }

    fn load_on(&self, device: tch::Device) -> stic::Result<Session> {
        let kind = parse_dtype(&self.dtype, device)?;
        Session::load(&self.model, self.adapter.as_deref(), self.processing.processing, kind, device)
    }
}
