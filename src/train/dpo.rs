//! The STIC stage-1 objective: DPO with a term that raises the likelihood of the preferred response,
//! `-log σ(β[(πc - rc) - (πr - rr)]) - α·πc` (plus the hinge and IPO variants).
use tch::{Kind, Tensor};

use super::forward::{backward, decoder_forward, row_logps};
use super::objective::{load_preprocessed, EncodedRow, Objective, StepOutput};
use super::packing::{pack, shared_prefix_len, PackedBatch, RowGroup};
use crate::error::{Error, Result};
use crate::image::Preprocessed;
use crate::model::LlavaNext;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum LossType {
    Sigmoid,
    Hinge,
    Ipo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
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
        DpoConfig {
            beta: 0.1,
            alpha: 1.0 / 1024.0,
            loss_type: LossType::Sigmoid,
            rejected_scoring: RejectedScoring::Paper,
        }
    }
}

/// Per-pair losses and rewards from summed log-probabilities (each [pairs]).
pub fn dpo_loss(
    cfg: &DpoConfig,
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
) -> (Tensor, Tensor, Tensor) {
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

/// A pair's image, preprocessed, with the frozen vision tower's output: the tower runs once for the reference and
/// the policy pass, which differ only in the projector.
pub struct PairImage {
    image: Preprocessed,
    tower: Tensor,
}

impl PairImage {
    pub fn load(model: &LlavaNext, path: &std::path::Path) -> Result<Self> {
        let image = load_preprocessed(model, path)?;
        Ok(PairImage { tower: model.tower_features(&image), image })
    }

    /// The image features with the projector of the adapter's current state (on: trained, off: original).
    fn features(&self, model: &LlavaNext) -> Result<Tensor> {
        model.image_features_from_tower(&self.image, &self.tower)
    }
}

pub struct DpoObjective {
    pub cfg: DpoConfig,
    pub checkpointing: bool,
    /// Run the common prefix of chosen and rejected once per pair (false: each row runs whole, for comparison).
    pub share_prefix: bool,
    /// Reference log-probabilities (chosen, rejected) by example index, when precomputed.
    pub reference_cache: Option<Vec<(f64, f64)>>,
}

impl DpoObjective {
    /// The pairs packed into one sequence: rows 0..pairs are the chosen rows, pairs..2·pairs the rejected ones;
    /// the image features of the i-th pair with an image are image i (text-only pairs have none).
    pub fn pack(&self, model: &LlavaNext, pairs: &[&PairExample]) -> Result<PackedBatch> {
        let n = pairs.len();
        let mut images = 0..;
        let groups: Vec<RowGroup> = pairs
            .iter()
            .enumerate()
            .map(|(i, e)| RowGroup {
                rows: vec![(i, &e.chosen), (n + i, &e.rejected)],
                image: e.image.as_ref().map(|_| images.next().expect("unbounded")),
                share_prefix: self.share_prefix,
            })
            .collect();
        pack(&groups, model.device())
    }

    /// Summed log-probs of every row ([chosen..., rejected...]); `features` has one entry per pair with an image.
    fn logps(
        &self,
        model: &LlavaNext,
        batch: &PackedBatch,
        features: &[Tensor],
        with_graph: bool,
        seed: i64,
    ) -> Result<(Tensor, Option<super::forward::Recompute>)> {
        let runs: Vec<Tensor> = batch.image_runs.iter().map(|&i| features[i].shallow_clone()).collect();
        let embeds = model.embed_inputs(&batch.ids, &runs)?;
        let pairs = batch.rows as i64 / 2;
        let own_top = (self.cfg.rejected_scoring == RejectedScoring::OfficialTopToken)
            .then(|| Tensor::arange(2 * pairs, (Kind::Int64, batch.ids.device())).ge(pairs));
        let (hidden, recompute) = decoder_forward(model, &embeds, batch, with_graph && self.checkpointing, seed);
        Ok((row_logps(model, &hidden, &batch.scored, own_top.as_ref()), recompute))
    }

    /// Reference log-probs: the same weights with the adapter switched off.
    pub fn reference_logps(&self, model: &LlavaNext, batch: &PackedBatch, images: &[PairImage]) -> Result<Tensor> {
        let switch =
            model.adapter_switch.clone().ok_or_else(|| Error::Input("DPO needs an adapter on the model".into()))?;
        switch.set_enabled(false);
        let result = tch::no_grad(|| {
            let features = images.iter().map(|i| i.features(model)).collect::<Result<Vec<_>>>()?;
            self.logps(model, batch, &features, false, 0).map(|(l, _)| l)
        });
        switch.set_enabled(true);
        result
    }
}

impl Objective for DpoObjective {
    type Example = PairExample;

    fn metric_names(&self) -> &'static [&'static str] {
        &[
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ]
    }

    fn tokens(&self, example: &PairExample) -> usize {
        let (c, r) = (&example.chosen, &example.rejected);
        let shared = if self.share_prefix { shared_prefix_len(&[c, r]) } else { 0 };
        c.ids.len() + r.ids.len() - shared
    }

    fn step(
        &self,
        model: &LlavaNext,
        examples: &[(usize, &PairExample)],
        loss_scale: f64,
        seed: i64,
    ) -> Result<StepOutput> {
        let (pass, recompute) = self.forward(model, examples, true, seed)?;
        let loss = pass.losses.mean(Kind::Float);
        backward(model, &(&loss * loss_scale), recompute);
        // the metrics' means (the loss first) in one read from the device, after backward is queued
        let means: Vec<Tensor> =
            pass.per_pair_metrics().iter().map(|t| t.to_kind(Kind::Float).mean(Kind::Float)).collect();
        let metrics = Vec::<f64>::try_from(Tensor::stack(&means, 0).to_kind(Kind::Double))?;
        if !metrics[0].is_finite() {
            return Err(Error::Training(format!("the loss is non-finite ({})", metrics[0])));
        }
        Ok(StepOutput { metrics, tokens: pass.tokens })
    }

    fn eval_metric_names(&self) -> &'static [&'static str] {
        self.metric_names()
    }

    /// The metrics summed over the pairs, with the number of pairs.
    fn evaluate(&self, model: &LlavaNext, examples: &[(usize, &PairExample)]) -> Result<(Vec<f64>, f64)> {
        let (pass, _) = tch::no_grad(|| self.forward(model, examples, false, 0))?;
        let sum = |t: &Tensor| t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
        Ok((pass.per_pair_metrics().iter().map(sum).collect(), examples.len() as f64))
    }
}

/// What a forward pass over pairs gives, per pair.
struct PairsPass {
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    tokens: usize,
}

impl PairsPass {
    /// In the order of `metric_names`.
    fn per_pair_metrics(&self) -> [Tensor; 7] {
        let (c, r) = (&self.chosen_rewards, &self.rejected_rewards);
        [
            self.losses.detach(),
            c.shallow_clone(),
            r.shallow_clone(),
            c - r,
            c.gt_tensor(r),
            self.policy_chosen.detach(),
            self.policy_rejected.detach(),
        ]
    }
}

impl DpoObjective {
    /// Reference and policy log-probs and the loss of each pair. `train`: dropout on, with a graph to backward
    /// through, and reference log-probs from the cache when there is one (it is indexed by training example).
    fn forward(
        &self,
        model: &LlavaNext,
        examples: &[(usize, &PairExample)],
        train: bool,
        seed: i64,
    ) -> Result<(PairsPass, Option<super::forward::Recompute>)> {
        let device = model.device();
        let batch = self.pack(model, &examples.iter().map(|(_, e)| *e).collect::<Vec<_>>())?;
        let images = examples
            .iter()
            .filter_map(|(_, e)| e.image.as_deref())
            .map(|path| PairImage::load(model, path))
            .collect::<Result<Vec<_>>>()?;
        let pairs = examples.len() as i64;
        let reference = match self.reference_cache.as_ref().filter(|_| train) {
            Some(cache) => {
                let (c, r): (Vec<f32>, Vec<f32>) =
                    examples.iter().map(|(i, _)| (cache[*i].0 as f32, cache[*i].1 as f32)).unzip();
                Tensor::cat(&[Tensor::from_slice(&c), Tensor::from_slice(&r)], 0).to_device(device)
            }
            None => self.reference_logps(model, &batch, &images)?,
        };
        model.adapter_switch.as_ref().expect("adapter present").set_training(train);
        let features = images.iter().map(|i| i.features(model)).collect::<Result<Vec<_>>>()?;
        let (policy, recompute) = self.logps(model, &batch, &features, train, seed)?;
        let (pc, pr) = (policy.narrow(0, 0, pairs), policy.narrow(0, pairs, pairs));
        let (rc, rr) = (reference.narrow(0, 0, pairs), reference.narrow(0, pairs, pairs));
        let (losses, chosen_rewards, rejected_rewards) = dpo_loss(&self.cfg, &pc, &pr, &rc, &rr);
        let pass = PairsPass {
            losses,
            chosen_rewards,
            rejected_rewards,
            policy_chosen: pc,
            policy_rejected: pr,
            tokens: batch.row_tokens,
        };
        Ok((pass, recompute))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_agree_on_the_command_line_and_in_the_configs() {
        use clap::ValueEnum;
        fn check<T: ValueEnum + serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
            names: &[&str],
        ) {
            let all = T::value_variants();
            assert_eq!(all.len(), names.len());
            for (value, &name) in all.iter().zip(names) {
                assert_eq!(value.to_possible_value().unwrap().get_name(), name);
                assert_eq!(serde_json::to_value(value).unwrap(), name);
                assert_eq!(&serde_json::from_value::<T>(name.into()).unwrap(), value);
            }
        }
        check::<LossType>(&["sigmoid", "hinge", "ipo"]);
        check::<RejectedScoring>(&["paper", "official_top_token"]);
    }

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
