//! The checks a training run's settings pass before anything is loaded, whether they come from the YAML config
//! or from flags: a negative learning rate would train away from the data, a NaN one would destroy the weights.
use super::config::{LossWeighting, TrainConfig};
use crate::error::{Error, Result};
use crate::settings::Range;

impl TrainConfig {
    /// Refuses the first setting a run cannot train with, naming it, its value and the range it must lie in.
    pub fn validate(&self) -> Result<()> {
        // max_grad_norm 0 turns clipping off, as in transformers.
        let numbers = [
            ("lr", self.lr, Range::NonNegative),
            ("projector_lr", self.projector_lr, Range::NonNegative),
            ("epochs", self.epochs, Range::Positive),
            ("warmup_ratio", self.warmup_ratio, Range::Fraction),
            ("weight_decay", self.weight_decay, Range::NonNegative),
            ("max_grad_norm", self.max_grad_norm, Range::NonNegative),
            ("dpo.beta", self.dpo.beta, Range::Positive),
            ("dpo.alpha", self.dpo.alpha, Range::NonNegative),
        ];
        for (name, value, range) in numbers {
            range.check(value).map_err(|why| invalid(name, &why))?;
        }
        let counts = [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("max_length", self.max_length),
            ("save_steps", self.save_steps),
            ("save_total_limit", self.save_total_limit),
            ("logging_steps", self.logging_steps),
            ("eval_steps", self.eval_steps.unwrap_or(1)),
        ];
        if let Some((name, _)) = counts.into_iter().find(|(_, value)| *value == 0) {
            return Err(invalid(name, "0 is not a whole number of at least 1"));
        }
        if self.max_steps == Some(0) {
            return Err(invalid("max_steps", "0 is not a whole number of at least 1"));
        }
        // Without loss scaling, f16 gradients underflow to zero and the adapter silently stops learning.
        if matches!(self.dtype.as_str(), "f16" | "float16") {
            return Err(invalid(
                "dtype",
                &format!("{} trains without loss scaling, so small gradients underflow; use bf16 (or f32)", self.dtype),
            ));
        }
        match (self.loss_weighting, self.device_batch) {
            (LossWeighting::DeviceBatch, None) => {
                return Err(invalid("device_batch", "loss_weighting device_batch needs the examples it pools"))
            }
            (LossWeighting::DeviceBatch, Some(examples)) if examples < self.batch_size => {
                return Err(invalid(
                    "device_batch",
                    &format!(
                        "{examples} is smaller than batch_size {}: a device batch pools whole micro-batches",
                        self.batch_size
                    ),
                ))
            }
            (LossWeighting::MicroBatch, Some(_)) => {
                return Err(invalid("device_batch", "it is read only with `loss_weighting: device_batch`"))
            }
            _ => {}
        }
        self.lora.validate().map_err(|why| {
            Error::Input(format!("training setting {why}; set it with --lora-r, --lora-alpha, --lora-dropout or in the lora section of the --config YAML"))
        })
    }
}

/// Settings that are only in the YAML config, without a flag.
const CONFIG_ONLY: [&str; 6] =
    ["warmup_ratio", "weight_decay", "max_grad_norm", "save_total_limit", "loss_weighting", "device_batch"];

fn invalid(name: &str, why: &str) -> Error {
    let flag = name.strip_prefix("dpo.").unwrap_or(name).replace(['.', '_'], "-");
    let fix = if CONFIG_ONLY.contains(&name) {
        format!("set `{name}` in the --config YAML")
    } else {
        format!("set it with --{flag} or as `{name}` in the --config YAML")
    };
    Error::Input(format!("training setting {name}: {why}; {fix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage1() -> TrainConfig {
        TrainConfig::shipped(crate::train::config::STAGE1_DEFAULTS)
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        for text in [
            crate::train::config::STAGE1_DEFAULTS,
            crate::train::config::STAGE2_DEFAULTS,
            include_str!("../../configs/official/stage1.yaml"),
            include_str!("../../configs/official/stage2.yaml"),
        ] {
            serde_yaml::from_str::<TrainConfig>(text).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn each_bad_value_is_named_with_its_flag() {
        type Case = (fn(&mut TrainConfig), &'static str);
        let cases: [Case; 13] = [
            (|c| c.lr = -1.0, "lr: -1 is not a finite number, 0 or more; set it with --lr"),
            (|c| c.lr = f64::NAN, "lr: NaN is not a finite number"),
            (|c| c.dpo.beta = -1.0, "dpo.beta: -1 is not a finite number above 0; set it with --beta or as `dpo.beta`"),
            (
                |c| c.warmup_ratio = 1.5,
                "warmup_ratio: 1.5 is not a number from 0 to 1; set `warmup_ratio` in the --config",
            ),
            (|c| c.epochs = 0.0, "epochs: 0 is not a finite number above 0"),
            (|c| c.lora.r = 0, "lora r is 0: the rank must be at least 1; set it with --lora-r"),
            (|c| c.grad_accum = 0, "grad_accum: 0 is not a whole number of at least 1; set it with --grad-accum"),
            (|c| c.max_steps = Some(0), "max_steps: 0 is not"),
            (|c| c.lora.dropout = 1.0, "lora dropout is 1: it must be at least 0 and below 1"),
            (
                |c| c.dtype = "f16".into(),
                "dtype: f16 trains without loss scaling, so small gradients underflow; use bf16",
            ),
            (|c| c.loss_weighting = LossWeighting::DeviceBatch, "device_batch: loss_weighting device_batch needs"),
            (
                |c| (c.loss_weighting, c.device_batch) = (LossWeighting::DeviceBatch, Some(0)),
                "device_batch: 0 is smaller than batch_size 1",
            ),
            (|c| c.device_batch = Some(16), "device_batch: it is read only with `loss_weighting: device_batch`; set"),
        ];
        for (spoil, expected) in cases {
            let mut cfg = stage1();
            spoil(&mut cfg);
            let error = cfg.validate().unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
