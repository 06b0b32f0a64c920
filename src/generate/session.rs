//! A loaded model with its tokenizer: turns prompt text and images into decoder inputs.
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use crate::adapter::Adapter;
use crate::error::{Error, Result};
use crate::generate::{expand_image_tokens, PreparedPrompt};
use crate::image::{self, Preprocessed, Processing};
use crate::model::config::Layout;
use crate::model::geometry::Geometry;
use crate::model::{LlavaConfig, LlavaNext};
use crate::text::tokenizer::IMAGE_TOKEN;
use crate::text::TextTokenizer;

pub struct Session {
    pub model: LlavaNext,
    pub tokenizer: TextTokenizer,
    pub adapter: Option<Adapter>,
}

/// `auto` picks CUDA when libtorch sees a GPU.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) {
            Some(i) => cuda(i),
            None => Err(Error::Input(format!("unknown device '{other}' (use cpu, cuda, cuda:N or auto)"))),
        },
    }
}

fn cuda(index: usize) -> Result<Device> {
    if !tch::Cuda::is_available() || index >= tch::Cuda::device_count() as usize {
        return Err(Error::Input(format!(
            "device cuda:{index} is not available (libtorch sees {} GPU(s))",
            tch::Cuda::device_count()
        )));
    }
    Ok(Device::Cuda(index))
}

/// `auto` is bf16 on CUDA and f32 on CPU.
pub fn parse_dtype(name: &str, device: Device) -> Result<Kind> {
    match name {
        "auto" => Ok(if device.is_cuda() { Kind::BFloat16 } else { Kind::Float }),
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        other => Err(Error::Input(format!("unknown dtype '{other}' (use f32, bf16, f16 or auto)"))),
    }
}

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A model folder.
    Folder(PathBuf),
    /// A geometry with random weights made in memory from a seed, with the shipped Mistral tokenizer
    /// (`--random-weights`: throughput checks without the checkpoint).
    Random { geometry: Geometry, seed: u64 },
}

impl ModelSource {
    /// `--model` or `--random-weights` (the command's parser requires one of them) and the seed of the latter.
    pub fn from_flags(model: Option<PathBuf>, random_weights: Option<Geometry>, seed: u64) -> Self {
        match (model, random_weights) {
            (Some(dir), _) => ModelSource::Folder(dir),
            (None, Some(geometry)) => ModelSource::Random { geometry, seed },
            (None, None) => unreachable!("--model or --random-weights is required"),
        }
    }

    /// The model folder; `what` (a command's step) needs one.
    pub fn folder(&self, what: &str) -> Result<&Path> {
        match self {
            ModelSource::Folder(dir) => Ok(dir),
            ModelSource::Random { .. } => {
                Err(Error::Input(format!("{what} needs a model folder: give --model instead of --random-weights")))
            }
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Folder(dir) => write!(f, "{}", dir.display()),
            ModelSource::Random { geometry, seed } => write!(f, "random-weights:{}:seed{seed}", geometry.name()),
        }
    }
}

/// Where a command's model comes from and how it runs: the model, an optional PEFT adapter on top, whose
/// processing to follow, and the dtype and device names (`auto` resolved when loading).
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model: ModelSource,
    pub adapter: Option<PathBuf>,
    pub processing: Option<Processing>,
    pub dtype: String,
    pub device: String,
}

impl ModelSpec {
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }

    pub fn load(&self) -> Result<Session> {
        self.load_on(self.device()?)
    }

    pub fn load_on(&self, device: Device) -> Result<Session> {
        let kind = parse_dtype(&self.dtype, device)?;
        match &self.model {
            ModelSource::Folder(dir) => Session::load(dir, self.adapter.as_deref(), self.processing, kind, device),
            ModelSource::Random { geometry, seed } => {
                Session::random(*geometry, *seed, self.processing, kind, device)?.with_adapter(self.adapter.as_deref())
            }
        }
    }

    /// Refuses an `output` (of `flag`) that would overwrite one of `inputs` or write into the model or adapter
    /// folder.
    pub fn check_output(&self, flag: &str, output: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
        let mut all = Vec::new();
        if let ModelSource::Folder(dir) = &self.model {
            all.push(("--model", dir.as_path()));
        }
        all.extend(self.adapter.as_deref().map(|adapter| ("--adapter", adapter)));
        all.extend_from_slice(inputs);
        crate::fsutil::check_output(flag, output, &all)
    }

    /// The settings a generation job's records depend on: model, adapter and dtype (resolved: `auto` is what it
    /// picks here), the sampling, and the task's own (`task`, a JSON object: prompts, benchmark…). Paths are
    /// compared resolved, so `./model` and `/abs/model` are one model.
    pub fn job_settings(
        &self,
        sampling: &crate::generate::SamplingConfig,
        task: serde_json::Value,
    ) -> serde_json::Value {
        let resolved = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let dtype = parse_device(&self.device)
            .and_then(|device| parse_dtype(&self.dtype, device))
            .map_or_else(|_| self.dtype.clone(), |kind| format!("{kind:?}"));
        let mut settings = serde_json::json!({
            "model": match &self.model {
                ModelSource::Folder(dir) => resolved(dir).display().to_string(),
                random => random.to_string(),
            },
            "adapter": self.adapter.as_deref().map(resolved),
            "dtype": dtype,
        });
        let fields = settings.as_object_mut().expect("an object");
        fields.extend(
            serde_json::to_value(sampling).expect("sampling serialises").as_object().cloned().unwrap_or_default(),
        );
        fields.extend(task.as_object().cloned().unwrap_or_default());
        settings
    }
}

impl Session {
    /// Loads a model folder, and a PEFT adapter folder on top of it when given. `processing` overrides the one
    /// the checkpoint's layout implies (LLaVA's code for an original checkpoint, transformers' for llava-hf).
    pub fn load(
        model_dir: &Path,
        adapter_dir: Option<&Path>,
        processing: Option<Processing>,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if !model_dir.is_dir() {
            return Err(Error::Input(format!("model folder {} does not exist", model_dir.display())));
        }
        let mut cfg = LlavaConfig::from_dir(model_dir, processing)?;
        let mut tokenizer = TextTokenizer::from_dir(model_dir, cfg.image.processing)?;
        tokenizer.limit_to_model_vocab(cfg.text.vocab_size);
        if cfg.layout == Layout::OriginalLlava {
            cfg.image_token_id = tokenizer.appended_image_id();
        }
        let model = LlavaNext::load(model_dir, cfg, kind, device)?;
        Session { model, tokenizer, adapter: None }.with_adapter(adapter_dir)
    }

    /// The ids generation stops at: the model's `eos_token_id` (generation_config.json, else config.json), else
    /// the tokenizer's EOS.
    pub fn stop_ids(&self) -> Vec<i64> {
        match &self.model.cfg.eos_token_ids {
            ids if ids.is_empty() => vec![self.tokenizer.eos_id],
            ids => ids.clone(),
        }
    }

    fn with_adapter(mut self, adapter_dir: Option<&Path>) -> Result<Self> {
        self.adapter = adapter_dir.map(|dir| Adapter::load(&mut self.model, dir, false)).transpose()?;
        Ok(self)
    }

    /// A model of `geometry` with random weights drawn from `seed` on `device` (what `init-tiny --seed` writes,
    /// for the tiny geometry), and the shipped tokenizer.
    pub fn random(
        geometry: Geometry,
        seed: u64,
        processing: Option<Processing>,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let mut cfg = geometry.config();
        if let Some(processing) = processing {
            cfg.image.processing = processing;
        }
        let mut tokenizer = TextTokenizer::shipped_mistral(cfg.image.processing)?;
        tokenizer.limit_to_model_vocab(cfg.text.vocab_size);
        let model = LlavaNext::random(cfg, seed as i64, kind, device)?;
        Ok(Session { model, tokenizer, adapter: None })
    }

    pub fn load_image(&self, path: &Path) -> Result<Preprocessed> {
        let img = image::load_image(path, self.model.cfg.image.max_pixels)?;
        Ok(image::preprocess(&img, &self.model.cfg.image))
    }

    /// The user turn LLaVA's scripts build: the image token on its own line before the text, unless the text
    /// already places it.
    pub fn user_text(text: &str, with_image: bool) -> String {
        if with_image && !text.contains(IMAGE_TOKEN) {
            format!("{IMAGE_TOKEN}\n{text}")
        } else {
            text.to_string()
        }
    }

    /// Image features for each image (in the order their placeholders appear).
    pub fn image_features(&self, images: &[&Preprocessed]) -> Result<Vec<Tensor>> {
        tch::no_grad(|| images.iter().map(|img| self.model.image_features(img)).collect())
    }

    /// Tokenises `text` (BOS added), checks it has one `<image>` per image and expands each to its features.
    pub fn prepare(&self, text: &str, image_features: Vec<Tensor>) -> Result<PreparedPrompt> {
        let ids = self.tokenizer.encode(text, true)?;
        let counts: Vec<usize> = image_features.iter().map(|f| f.size()[0] as usize).collect();
        let placeholders = ids.iter().filter(|&&i| i == self.tokenizer.image_id).count();
        if placeholders != counts.len() {
            return Err(Error::Input(format!(
                "the text has {placeholders} {IMAGE_TOKEN} token(s) but {} image(s) were given: put one {IMAGE_TOKEN} where each image goes",
                counts.len()
            )));
        }
        let ids = expand_image_tokens(&ids, self.tokenizer.image_id, &counts)?;
        let cfg = &self.model.cfg;
        if let Some(limit) =
            cfg.llava_max_length.filter(|&l| cfg.image.processing == Processing::Llava && ids.len() > l)
        {
            return Err(Error::Input(format!(
                "the prompt is {} tokens long (image features included); LLaVA's code cuts inputs at {limit} \
                 (tokenizer_model_max_length in config.json): shorten the prompt",
                ids.len()
            )));
        }
        Ok(PreparedPrompt { ids, image_features })
    }
}
