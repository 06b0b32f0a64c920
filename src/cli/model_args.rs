//! Flags shared by every command that loads a model.
use std::path::PathBuf;

use stic::session::{parse_device, parse_dtype, Session};
use stic::stic::sharding::Sharding;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder: config.json, tokenizer.json and *.safetensors (llava-hf or original LLaVA layout).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter folder (from stic, Python PEFT, or STIC's released adapters).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// f32, bf16, f16 or auto (bf16 on CUDA, f32 on CPU).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
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
        Session::load(&self.model, self.adapter.as_deref(), kind, device)
    }
}
