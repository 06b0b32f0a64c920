//! The STIC stage-1 objective: DPO with a term that raises the likelihood of the preferred response,
//! `-log σ(β[(πc - rc) - (πr - rr)]) - α·πc` (plus the hinge and IPO variants).
use tch::{Kind, Tensor};

use super::forward::{backward, decoder_forward, row_logps, TokenBatch};
use super::trainer::{load_preprocessed, EncodedRow, Objective, StepOutput};
use crate::error::{Error, Result};
use crate::image::Preprocessed;
use std::path::PathBuf;
use crate::model::LlavaNext;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    Sigmoid,
    Hinge,
    Ipo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectedScoring {
    /// The log-probability of the rejected tokens (the paper's equation).
    Paper,
    /// The official code's quirk: the model's own top-1 token (top-2 where top-1 is the label).
    OfficialTopToken,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    pub beta: f64,
    /// Weight of the chosen response's log-likelihood term.
    pub alpha: f64,
    pub loss_type: LossType,
    pub rejected_scoring: RejectedScoring,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig { beta: 0.1, alpha: 1.0 / 1024.0, loss_type: LossType::Sigmoid, rejected_scoring: RejectedScoring::Paper }
    }
}

/// Per-pair losses and rewards from summed log-probabilities (each [pairs]).
pub fn dpo_loss(cfg: &DpoConfig, policy_chosen: &Tensor, policy_rejected: &Tensor, ref_chosen: &Tensor, ref_rejected: &Tensor) -> (Tensor, Tensor, Tensor) {
    let h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected);
    let preference = match cfg.loss_type {
        LossType::Sigmoid => -(&h * cfg.beta).log_sigmoid(),
        LossType::Hinge => ((&h * cfg.beta).neg() + 1.0).relu(),
        LossType::Ipo => (&h - 1.0 / (2.0 * cfg.beta)).square(),
    };
    let losses = preference - policy_chosen * cfg.alpha;
    let chosen_rewards = (policy_chosen - ref_chosen).detach() * cfg.beta;
    let rejected_rewards = (policy_rejected - ref_rejected).detach() * cfg.beta;
    (losses, chosen_rewards, rejected_rewards)
}

/// One preference pair ready for the model: the shared image (none for text-only prompts), then the chosen and
/// the rejected row.
pub struct PairExample {
    pub image: Option<PathBuf>,
    pub chosen: EncodedRow,
    pub rejected: EncodedRow,
}

pub struct DpoObjective {
    pub cfg: DpoConfig,
    pub checkpointing: bool,
    pub pad_id: i64,
    /// Reference log-probabilities (chosen, rejected) by example index, when precomputed.
    pub reference_cache: Option<Vec<(f64, f64)>>,
}

/// Right-pads rows into a batch on `device`.
pub fn token_batch(rows: &[&EncodedRow], pad_id: i64, device: tch::Device) -> TokenBatch {
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let (mut ids, mut mask, mut scored) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let pad = t - row.ids.len();
        ids.extend(row.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        mask.extend(std::iter::repeat_n(1i64, row.ids.len()).chain(std::iter::repeat_n(0, pad)));
        scored.extend(row.scored.iter().copied().chain(std::iter::repeat_n(false, pad)));
    }
    let shape = [rows.len() as i64, t as i64];
    TokenBatch {
        ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        scored: Tensor::from_slice(&scored).view(shape).to_device(device),
    }
}

impl DpoObjective {
    /// Summed log-probs of every row ([chosen..., rejected...]); `features` has one entry per pair with an image.
    fn logps(&self, model: &LlavaNext, batch: &TokenBatch, features: &[Tensor], with_graph: bool, seed: i64) -> Result<(Tensor, Option<super::forward::Recompute>)> {
        let doubled: Vec<Tensor> = features.iter().chain(features.iter()).map(|f| f.shallow_clone()).collect();
        let embeds = model.embed_inputs(&batch.ids, &doubled)?;
        let pairs = batch.ids.size()[0] / 2;
        let own_top = (self.cfg.rejected_scoring == RejectedScoring::OfficialTopToken).then(|| {
            Tensor::arange(2 * pairs, (Kind::Int64, batch.ids.device())).ge(pairs)
        });
        let (hidden, recompute) = decoder_forward(model, &embeds, &batch.mask, with_graph && self.checkpointing, seed);
        let (logps, _) = row_logps(model, &hidden, batch, own_top.as_ref());
        Ok((logps, recompute))
    }

    /// Reference log-probs: the same weights with the adapter switched off.
    pub fn reference_logps(&self, model: &LlavaNext, batch: &TokenBatch, images: &[&Preprocessed]) -> Result<Tensor> {
        let switch = model.adapter_switch.clone().ok_or_else(|| Error::Input("DPO needs an adapter on the model".into()))?;
        switch.set_enabled(false);
        let result = tch::no_grad(|| {
            let features = images.iter().map(|img| model.image_features(img)).collect::<Result<Vec<_>>>()?;
            self.logps(model, batch, &features, false, 0).map(|(l, _)| l)
        });
        switch.set_enabled(true);
        result
    }
}

impl Objective for DpoObjective {
    type Example = PairExample;

    fn metric_names(&self) -> &'static [&'static str] {
        &["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]
    }

    fn step(&self, model: &LlavaNext, examples: &[(usize, &PairExample)], loss_scale: f64, seed: i64) -> Result<StepOutput> {
        let device = model.device();
        let rows: Vec<&EncodedRow> = examples.iter().map(|(_, e)| &e.chosen).chain(examples.iter().map(|(_, e)| &e.rejected)).collect();
        let batch = token_batch(&rows, self.pad_id, device);
        let loaded = examples.iter().filter_map(|(_, e)| e.image.as_ref()).map(|path| load_preprocessed(model, path)).collect::<Result<Vec<_>>>()?;
        let images: Vec<&Preprocessed> = loaded.iter().collect();
        let pairs = examples.len() as i64;
        let reference = match &self.reference_cache {
            Some(cache) => {
                let (c, r): (Vec<f32>, Vec<f32>) = examples.iter().map(|(i, _)| (cache[*i].0 as f32, cache[*i].1 as f32)).unzip();
                Tensor::cat(&[Tensor::from_slice(&c), Tensor::from_slice(&r)], 0).to_device(device)
            }
            None => self.reference_logps(model, &batch, &images)?,
        };
        model.adapter_switch.as_ref().expect("adapter present").set_training(true);
        let features = images.iter().map(|img| model.image_features(img)).collect::<Result<Vec<_>>>()?;
        let (policy, recompute) = self.logps(model, &batch, &features, true, seed)?;
        let (pc, pr) = (policy.narrow(0, 0, pairs), policy.narrow(0, pairs, pairs));
        let (rc, rr) = (reference.narrow(0, 0, pairs), reference.narrow(0, pairs, pairs));
        let (losses, chosen_rewards, rejected_rewards) = dpo_loss(&self.cfg, &pc, &pr, &rc, &rr);
        let loss = losses.mean(Kind::Float);
        let loss_value = loss.double_value(&[]);
        if !loss_value.is_finite() {
            return Err(Error::Training(format!("the loss is non-finite ({loss_value})")));
        }
        backward(model, &(&loss * loss_scale), recompute);
        let mean = |t: &Tensor| t.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        Ok(StepOutput {
            metrics: vec![
                loss_value,
                mean(&chosen_rewards),
                mean(&rejected_rewards),
                mean(&(&chosen_rewards - &rejected_rewards)),
                mean(&chosen_rewards.gt_tensor(&rejected_rewards)),
                mean(&pc.detach()),
                mean(&pr.detach()),
            ],
            tokens: rows.iter().map(|r| r.ids.len()).sum(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_loss_matches_the_formula() {
        let cfg = DpoConfig::default();
        let t = |v: f32| Tensor::from_slice(&[v]);
        let (loss, c, r) = dpo_loss(&cfg, &t(-10.0), &t(-14.0), &t(-11.0), &t(-12.0));
        let h: f64 = (-10.0 + 11.0) - (-14.0 + 12.0);
        let expect = -(1.0 / (1.0 + (-0.1 * h).exp())).ln() + 10.0 / 1024.0;
        assert!((loss.double_value(&[0]) - expect).abs() < 1e-6);
        assert!((c.double_value(&[0]) - 0.1).abs() < 1e-6);
        assert!((r.double_value(&[0]) + 0.2).abs() < 1e-6);
    }

    #[test]
    fn hinge_and_ipo_losses() {
        let t = |v: f32| Tensor::from_slice(&[v]);
        let base = DpoConfig { alpha: 0.0, ..Default::default() };
        let hinge = DpoConfig { loss_type: LossType::Hinge, ..base };
        let ipo = DpoConfig { loss_type: LossType::Ipo, ..base };
        // h = 3
        let (l, _, _) = dpo_loss(&hinge, &t(0.0), &t(-3.0), &t(0.0), &t(0.0));
        assert!((l.double_value(&[0]) - 0.7).abs() < 1e-6);
        let (l, _, _) = dpo_loss(&ipo, &t(0.0), &t(-3.0), &t(0.0), &t(0.0));
        assert!((l.double_value(&[0]) - 4.0).abs() < 1e-5);
    }
}
