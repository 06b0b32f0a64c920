//! Flags shared by every command that loads a model.
use std::path::PathBuf;

use stic::image::Processing;
use stic::session::{parse_device, parse_dtype, Session};
use stic::stic::sharding::Sharding;

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
    #[arg(long, value_parser = super::choices::processing())]
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

    /// Refuses an `output` (of `flag`) that would overwrite one of `inputs` or write into the model or adapter
    /// folder.
    pub fn check_output(&self, flag: &str, output: &std::path::Path, inputs: &[(&str, &std::path::Path)]) -> stic::Result<()> {
        let mut all = vec![("--model", self.model.as_path())];
        all.extend(self.adapter.as_deref().map(|adapter| ("--adapter", adapter)));
        all.extend_from_slice(inputs);
        stic::fsutil::check_output(flag, output, &all)
    }

    /// The settings a generation job's records depend on: model, adapter and dtype (resolved: `auto` is what it
    /// picks here), the sampling, and the task's own (`task`, a JSON object: prompts, benchmark…). Paths are
    /// compared resolved, so `./model` and `/abs/model` are one model.
    pub fn job_settings(&self, sampling: &stic::generate::SamplingConfig, task: serde_json::Value) -> serde_json::Value {
        let resolved = |path: &std::path::Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let dtype = parse_device(&self.device)
            .and_then(|device| parse_dtype(&self.dtype, device))
            .map_or_else(|_| self.dtype.clone(), |kind| format!("{kind:?}"));
        let mut settings = serde_json::json!({
            "model": resolved(&self.model),
            "adapter": self.adapter.as_deref().map(resolved),
            "dtype": dtype,
        });
        let fields = settings.as_object_mut().expect("an object");
        fields.extend(serde_json::to_value(sampling).expect("sampling serialises").as_object().cloned().unwrap_or_default());
        fields.extend(task.as_object().cloned().unwrap_or_default());
        settings
    }

    fn load_on(&self, device: tch::Device) -> stic::Result<Session> {
        let kind = parse_dtype(&self.dtype, device)?;
        Session::load(&self.model, self.adapter.as_deref(), self.processing.processing, kind, device)
    }
}
