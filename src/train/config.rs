//! The settings of a training run (`configs/*.yaml`, overridden by flags).
use std::path::Path;

use super::dpo::{LossType, RejectedScoring};
use super::tracking::ReportTo;
use crate::error::{Error, Result};
use crate::model::lora::LoraSettings;

/// The settings `train-dpo` (STIC stage 1) starts from when no config is given.
pub const STAGE1_DEFAULTS: &str = include_str!("../../configs/paper/stage1.yaml");
/// The settings `train-sft` (STIC stage 2) starts from when no config is given.
pub const STAGE2_DEFAULTS: &str = include_str!("../../configs/paper/stage2.yaml");

/// Settings of a training run; `configs/*.yaml` hold them and command-line flags override them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub lora: LoraSettings,
    pub lr: f64,
    pub projector_lr: f64,
    pub epochs: f64,
    #[serde(default)]
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub max_length: usize,
    pub save_steps: usize,
    /// Steps between held-out evaluations (default: save_steps); there is one at the end too.
    #[serde(default)]
    pub eval_steps: Option<usize>,
    /// Steps whose metrics one log row averages.
    #[serde(default = "default_logging_steps")]
    pub logging_steps: usize,
    #[serde(default)]
    pub report_to: ReportTo,
    #[serde(default = "default_save_total_limit")]
    pub save_total_limit: usize,
    pub seed: u64,
    pub gradient_checkpointing: bool,
    pub template: crate::text::Template,
    #[serde(default = "default_auto")]
    pub dtype: String,
    #[serde(default = "default_auto")]
    pub device: String,
    #[serde(default)]
    pub dpo: super::dpo::DpoConfig,
    /// Prompts without `<image>` and no image features (the official stage 1: its stored prompts have none, so
    /// LLaVA drops the features).
    #[serde(default)]
    pub text_only: bool,
    /// How images become features (the official stage 2 uses `pad_flat`).
    #[serde(default)]
    pub image_layout: ImageLayout,
    /// Put `<image>` at the front of the message that holds it, on its own line (LLaVA's `preprocess_multimodal`).
    #[serde(default)]
    pub image_token_first: bool,
    /// LoRA dropout 0 whatever `lora.dropout` says (the official DPO trainer's `disable_dropout=True`).
    #[serde(default)]
    pub disable_dropout: bool,
    // Both left out of the saved config at their defaults, so that checkpoints saved before they existed resume.
    #[serde(default, skip_serializing_if = "LossWeighting::is_micro_batch")]
    pub loss_weighting: LossWeighting,
    /// The examples a `device_batch` weighting pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_batch: Option<usize>,
}

/// How a step's SFT token losses are averaged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossWeighting {
    /// The token mean of each micro-batch, the micro-batches weighed by their examples' share of the step.
    #[default]
    MicroBatch,
    /// The token mean over each run of `device_batch` consecutive examples of the step, the runs weighed equally:
    /// a device batch of transformers' Trainer whose model returns the mean token loss of its forward (the
    /// official stage 2: 16 examples per device, one forward each).
    DeviceBatch,
}

impl LossWeighting {
    fn is_micro_batch(&self) -> bool {
        *self == LossWeighting::MicroBatch
    }
}

impl TrainConfig {
    /// The examples whose scored tokens one loss mean pools, under `loss_weighting: device_batch`.
    pub fn pooled_device_batch(&self) -> Option<usize> {
        (self.loss_weighting == LossWeighting::DeviceBatch).then_some(self.device_batch).flatten()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageLayout {
    /// As the model's config says (anyres for LLaVA-v1.6).
    #[default]
    Model,
    /// LLaVA's `image_aspect_ratio pad` + `mm_patch_merge_type flat`: the image padded to a square with the mean
    /// colour, one tile, its 576 features without `image_newline`.
    PadFlat,
}

fn default_logging_steps() -> usize {
    1
}

fn default_save_total_limit() -> usize {
    2
}

fn default_auto() -> String {
    "auto".into()
}

/// Settings given on the command line, each replacing the config's value when set.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub lr: Option<f64>,
    pub projector_lr: Option<f64>,
    pub epochs: Option<f64>,
    pub max_steps: Option<usize>,
    pub lora_r: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub batch_size: Option<usize>,
    pub grad_accum: Option<usize>,
    pub max_length: Option<usize>,
    pub save_steps: Option<usize>,
    pub eval_steps: Option<usize>,
    pub logging_steps: Option<usize>,
    pub report_to: Option<ReportTo>,
    pub seed: Option<u64>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub gradient_checkpointing: Option<bool>,
    /// DPO's (train-dpo only).
    pub beta: Option<f64>,
    pub alpha: Option<f64>,
    pub loss_type: Option<LossType>,
    pub rejected_scoring: Option<RejectedScoring>,
}

impl Overrides {
    pub fn apply(&self, cfg: &mut TrainConfig) {
        fn set<T: Clone>(field: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *field = v.clone();
            }
        }
        set(&mut cfg.lr, &self.lr);
        set(&mut cfg.projector_lr, &self.projector_lr);
        set(&mut cfg.epochs, &self.epochs);
        set(&mut cfg.lora.r, &self.lora_r);
        set(&mut cfg.lora.alpha, &self.lora_alpha);
        set(&mut cfg.lora.dropout, &self.lora_dropout);
        set(&mut cfg.batch_size, &self.batch_size);
        set(&mut cfg.grad_accum, &self.grad_accum);
        set(&mut cfg.max_length, &self.max_length);
        set(&mut cfg.save_steps, &self.save_steps);
        set(&mut cfg.seed, &self.seed);
        set(&mut cfg.device, &self.device);
        set(&mut cfg.dtype, &self.dtype);
        set(&mut cfg.gradient_checkpointing, &self.gradient_checkpointing);
        set(&mut cfg.report_to, &self.report_to);
        set(&mut cfg.logging_steps, &self.logging_steps);
        if self.eval_steps.is_some() {
            cfg.eval_steps = self.eval_steps;
        }
        if self.max_steps.is_some() {
            cfg.max_steps = self.max_steps;
        }
        set(&mut cfg.dpo.beta, &self.beta);
        set(&mut cfg.dpo.alpha, &self.alpha);
        set(&mut cfg.dpo.loss_type, &self.loss_type);
        set(&mut cfg.dpo.rejected_scoring, &self.rejected_scoring);
    }
}

impl TrainConfig {
    /// The settings of a shipped config ([`STAGE1_DEFAULTS`], [`STAGE2_DEFAULTS`]).
    pub fn shipped(text: &str) -> Self {
        serde_yaml::from_str(text).expect("the shipped configs parse")
    }

    pub fn from_yaml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_yaml::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
    }

    /// Settings that must not change between a run and its resumption.
    pub(crate) fn resume_signature(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        for volatile in ["save_steps", "save_total_limit", "device", "eval_steps", "logging_steps", "report_to"] {
            v.as_object_mut().expect("object").remove(volatile);
        }
        v
    }

    /// Steps between held-out evaluations.
    pub fn eval_every(&self) -> usize {
        self.eval_steps.unwrap_or(self.save_steps).max(1)
    }
}
