//! AdamW (as `torch.optim.AdamW`), linear warm-up then cosine decay, and global-norm gradient clipping.
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// A group of parameters sharing one learning rate (LoRA, projector).
pub struct ParamGroup {
    pub params: Vec<(String, Tensor)>,
    pub lr: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub groups: Vec<ParamGroup>,
    /// First and second moments, by parameter name.
    pub state: Vec<(String, Tensor, Tensor)>,
    pub steps: i64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, groups: Vec<ParamGroup>) -> Self {
        let state = groups
            .iter()
            .flat_map(|g| g.params.iter())
            .map(|(name, p)| (name.clone(), p.zeros_like(), p.zeros_like()))
            .collect();
        AdamW { cfg, groups, state, steps: 0 }
    }

    /// One update with every group's learning rate multiplied by `lr_factor`.
    pub fn step(&mut self, lr_factor: f64) {
        self.steps += 1;
        let t = self.steps as f64;
        let bias1 = 1.0 - self.cfg.beta1.powf(t);
        let bias2_sqrt = (1.0 - self.cfg.beta2.powf(t)).sqrt();
        let mut moments = self.state.iter_mut();
        tch::no_grad(|| {
            for group in &self.groups {
                let lr = group.lr * lr_factor;
                for (_, p) in &group.params {
                    let (_, m, v) = moments.next().expect("one state per parameter");
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    let mut p = p.shallow_clone();
                    if self.cfg.weight_decay != 0.0 {
                        let _ = p.g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
                    }
                    let _ = m.g_mul_scalar_(self.cfg.beta1);
                    let _ = m.g_add_(&(&g * (1.0 - self.cfg.beta1)));
                    let _ = v.g_mul_scalar_(self.cfg.beta2);
                    let _ = v.g_add_(&(&g * &g * (1.0 - self.cfg.beta2)));
                    let denom = v.sqrt() / bias2_sqrt + self.cfg.eps;
                    let _ = p.g_sub_(&(&*m / denom * (lr / bias1)));
                }
            }
        });
    }

    pub fn zero_grad(&mut self) {
        for group in &self.groups {
            for (_, p) in &group.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
        }
    }

    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter().map(|(_, p)| p))
    }
}

/// Whether every element of every tensor is finite, read from the device once.
pub fn all_finite<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> bool {
    let flags: Vec<Tensor> = tensors.map(|t| t.isfinite().all()).collect();
    flags.is_empty() || bool::try_from(Tensor::stack(&flags, 0).all()).unwrap_or(false)
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm<'a>(params: impl Iterator<Item = &'a Tensor>, max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = params.map(|p| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return 0.0;
    }
    let total = tch::no_grad(|| {
        let squares: Vec<Tensor> =
            grads.iter().map(|g| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float)).collect();
        Tensor::stack(&squares, 0).sum(Kind::Float).sqrt().double_value(&[])
    });
    if max_norm > 0.0 {
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        if coef < 1.0 {
            tch::no_grad(|| {
                for g in &grads {
                    let _ = g.shallow_clone().g_mul_scalar_(coef);
                }
            });
        }
    }
    total
}

/// transformers' `get_cosine_schedule_with_warmup`: the factor applied to the base learning rate at `step`.
pub fn cosine_with_warmup(step: usize, warmup_steps: usize, total_steps: usize) -> f64 {
    if step < warmup_steps {
        return step as f64 / warmup_steps.max(1) as f64;
    }
    let progress = (step - warmup_steps) as f64 / (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_finite_finds_one_non_finite_element_among_the_tensors() {
        let finite = [Tensor::from_slice(&[1.0f32, 2.0]), Tensor::from_slice(&[3.0f32])];
        assert!(all_finite(finite.iter()));
        assert!(all_finite(std::iter::empty()));
        for bad in [f32::NAN, f32::INFINITY] {
            let tensors = [Tensor::from_slice(&[1.0f32, 2.0]), Tensor::from_slice(&[3.0f32, bad])];
            assert!(!all_finite(tensors.iter()));
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(cosine_with_warmup(0, 3, 100), 0.0);
        assert!((cosine_with_warmup(1, 3, 100) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(cosine_with_warmup(3, 3, 100), 1.0);
        assert!((cosine_with_warmup(51, 3, 99) - 0.5).abs() < 1e-12);
        assert!(cosine_with_warmup(100, 3, 100).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_the_closed_form_of_its_first_step() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        (&p * &p).sum(Kind::Float).backward();
        let mut opt = AdamW::new(
            AdamWConfig { weight_decay: 0.1, ..Default::default() },
            vec![ParamGroup { params: vec![("p".into(), p.shallow_clone())], lr: 0.01 }],
        );
        opt.step(1.0);
        // First step: m̂ = g, v̂ = g², so the update is lr * g / (|g| + eps) = ±lr, after decay p *= 1 - lr*wd.
        let got: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        let expect = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, e) in got.iter().zip(expect) {
            assert!((*g as f64 - e).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        (&p * 1.0).sum(Kind::Float).backward();
        let q = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        (&q * 0.0).sum(Kind::Float).backward();
        let norm = clip_grad_norm([&p, &q].into_iter(), 1.0);
        assert!((norm - 2f64.sqrt()).abs() < 1e-6);
        let after = p.grad().norm().double_value(&[]);
        assert!((after - 1.0).abs() < 1e-5);
    }
}
