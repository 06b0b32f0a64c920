//! LoRA layers with PEFT semantics (`y = W x + B(A(dropout(x))) * scaling`); the adapter files are in `crate::adapter`.
use std::cell::Cell;
use std::rc::Rc;
use tch::Tensor;

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
    /// Adds `B(A(dropout(x))) * scaling` to `y` in the activations' dtype. A and B stay f32 master weights; in a
    /// bf16 (or f16) model they are cast to it, as in the official recipe (DeepSpeed bf16 runs the LoRA layers in
    /// bf16 and keeps f32 copies for the optimizer) and as PEFT computes under autocast; the cast is
    /// differentiable, so their gradients arrive in f32. An f32 model casts nothing.
    pub fn add_to(&self, y: Tensor, x: &Tensor) -> Tensor {
        if self.switch.disabled.get() {
            return y;
        }
        let kind = x.kind();
        let dropped = (self.switch.training.get() && self.dropout > 0.0).then(|| x.dropout(self.dropout, true));
        let x = dropped.as_ref().unwrap_or(x);
        let delta = x.linear(&self.a.to_kind(kind), None::<Tensor>).linear(&self.b.to_kind(kind), None::<Tensor>);
        y + delta * self.scaling
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A [4, 8] and B [5, 4] f32 leaves that require grad, with scaling 2.
    fn layer() -> LoraLayer {
        tch::manual_seed(0);
        LoraLayer {
            a: Tensor::randn([4, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            b: Tensor::randn([5, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            scaling: 2.0,
            dropout: 0.0,
            switch: Rc::new(LoraSwitch::default()),
        }
    }

    fn grads(lora: &LoraLayer) -> (Tensor, Tensor) {
        let (a, b) = (lora.a.grad().copy(), lora.b.grad().copy());
        let _ = lora.a.grad().zero_();
        let _ = lora.b.grad().zero_();
        (a, b)
    }

    #[test]
    fn bf16_activations_compute_in_bf16_and_send_f32_gradients_to_the_master_weights() {
        let lora = layer();
        let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let y = Tensor::randn([2, 3, 5], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let out = lora.add_to(y.shallow_clone(), &x);
        assert_eq!(out.kind(), Kind::BFloat16);
        out.to_kind(Kind::Float).sum(Kind::Float).backward();
        let (grad_a, grad_b) = grads(&lora);
        assert_eq!((grad_a.kind(), grad_b.kind()), (Kind::Float, Kind::Float));

        // Every step in bf16, as a bf16 PEFT layer does: A and B rounded to bf16, x never widened.
        let (a16, b16) = (
            lora.a.detach().to_kind(Kind::BFloat16).set_requires_grad(true),
            lora.b.detach().to_kind(Kind::BFloat16).set_requires_grad(true),
        );
        let expected = &y + x.linear(&a16, None::<Tensor>).linear(&b16, None::<Tensor>) * 2.0;
        assert!(out.equal(&expected), "the bf16 path differs from bf16 arithmetic");
        expected.to_kind(Kind::Float).sum(Kind::Float).backward();
        assert!(grad_a.equal(&a16.grad().to_kind(Kind::Float)));
        assert!(grad_b.equal(&b16.grad().to_kind(Kind::Float)));

        let widened = (y.to_kind(Kind::Float)
            + x.to_kind(Kind::Float).linear(&lora.a, None::<Tensor>).linear(&lora.b, None::<Tensor>) * 2.0)
            .to_kind(Kind::BFloat16);
        assert!(!out.equal(&widened), "the result is the one of an f32 LoRA path");
    }

    #[test]
    fn f32_activations_compute_in_f32_exactly() {
        let lora = layer();
        let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::randn([2, 3, 5], (Kind::Float, Device::Cpu));
        let out = lora.add_to(y.shallow_clone(), &x);
        let expected = &y + x.linear(&lora.a, None::<Tensor>).linear(&lora.b, None::<Tensor>) * 2.0;
        assert!(out.equal(&expected));
        out.sum(Kind::Float).backward();
        let (grad_a, grad_b) = grads(&lora);
        expected.sum(Kind::Float).backward();
        let (expected_a, expected_b) = grads(&lora);
        assert!(grad_a.equal(&expected_a) && grad_b.equal(&expected_b));
    }
}
