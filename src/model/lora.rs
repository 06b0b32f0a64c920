//! LoRA layers with PEFT semantics (`y = W x + B(A(dropout(x))) * scaling`); the adapter files are in `crate::adapter`.
use std::cell::Cell;
use std::rc::Rc;
use tch::{Kind, Tensor};

/// Switches shared by every LoRA layer of one model: the adapter can be turned off (the DPO reference policy is
/// the same weights without it) and dropout only applies while training.
#[derive(Debug, Default)]
pub struct LoraSwitch {
    disabled: Cell<bool>,
    training: Cell<bool>,
}

impl LoraSwitch {
    pub fn set_enabled(&self, enabled: bool) {
        self.disabled.set(!enabled);
    }

    pub fn set_training(&self, training: bool) {
        self.training.set(training);
    }

    pub fn enabled(&self) -> bool {
        !self.disabled.get()
    }
}

pub struct LoraLayer {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
    pub switch: Rc<LoraSwitch>,
}

impl LoraLayer {
    pub fn add_to(&self, y: Tensor, x: &Tensor) -> Tensor {
        if self.switch.disabled.get() {
            return y;
        }
        let x = x.to_kind(self.a.kind());
        let x = if self.switch.training.get() && self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x };
        let delta = x.linear(&self.a, None::<Tensor>).linear(&self.b, None::<Tensor>) * self.scaling;
        if y.kind() == delta.kind() {
            y + delta
        } else {
            let kind = y.kind();
            (y.to_kind(Kind::Float) + delta.to_kind(Kind::Float)).to_kind(kind)
        }
    }
}

/// What to adapt and how; serialised into configs and checkpoints.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    /// Module names (`q_proj`, …) or `all-linear` (every linear layer of the language model except lm_head).
    pub target_modules: Vec<String>,
    /// Train the projector in full and save it as PEFT `modules_to_save`.
    #[serde(default)]
    pub train_projector: bool,
}

impl LoraSettings {
    /// Refuses settings LoRA cannot run with: r ≥ 1, dropout in [0, 1), alpha a positive number.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.r == 0 {
            return Err("lora r is 0: the rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("lora dropout is {}: it must be at least 0 and below 1", self.dropout));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("lora alpha is {}: it must be a positive number", self.alpha));
        }
        Ok(())
    }

    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub(crate) fn targets(&self, module_path: &str) -> bool {
        let leaf = module_path.rsplit('.').next().unwrap_or(module_path);
        self.target_modules.iter().any(|t| t == "all-linear" || t == leaf || module_path.ends_with(&format!(".{t}")))
    }

    /// The regular expression PEFT gets as `target_modules`: the language model's layers, and the vision
    /// tower's only when the adapter has LoRA there (its q/k/v projections have the same names).
    pub(crate) fn peft_target_regex(modules: &[String]) -> String {
        let mut leaves: Vec<&str> = modules.iter().filter_map(|m| m.rsplit('.').next()).collect();
        leaves.sort();
        leaves.dedup();
        let parts = if modules.iter().any(|m| m.starts_with("vision_tower.")) {
            "(language_model|vision_tower)"
        } else {
            "language_model"
        };
        format!(r".*{parts}.*\.({})", leaves.join("|"))
    }
}
