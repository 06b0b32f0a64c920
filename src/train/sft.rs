//! STIC stage 2 objective: next-token cross-entropy on the assistant turns of LLaVA-format conversations.
use std::path::PathBuf;
use tch::{Kind, Tensor};

use super::forward::{backward, decoder_forward, row_logps, Recompute};
use super::objective::{load_preprocessed, EncodedRow, Objective, StepOutput};
use super::packing::{pack, RowGroup};
use crate::error::{Error, Result};
use crate::model::LlavaNext;

pub struct SftExample {
    pub image: Option<PathBuf>,
    pub row: EncodedRow,
}

pub struct SftObjective {
    pub checkpointing: bool,
}

impl Objective for SftObjective {
    type Example = SftExample;

    fn metric_names(&self) -> &'static [&'static str] {
        &["loss", "scored_tokens"]
    }

    fn tokens(&self, example: &SftExample) -> usize {
        example.row.ids.len()
    }

    /// The mean over all scored tokens of the micro-batch, as transformers' causal-LM loss.
    fn step(
        &self,
        model: &LlavaNext,
        examples: &[(usize, &SftExample)],
        loss_scale: f64,
        seed: i64,
    ) -> Result<StepOutput> {
        let (pass, recompute) = self.forward(model, examples, true, seed)?;
        let loss = &pass.nll / pass.scored.max(1) as f64;
        backward(model, &(&loss * loss_scale), recompute);
        // read after backward is queued, so that the device is not drained between the passes
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(Error::Training(format!("the loss is non-finite ({value})")));
        }
        Ok(StepOutput { metrics: vec![value, pass.scored as f64], tokens: pass.tokens })
    }

    /// The positions scored as labels: every scored one but the first token, which nothing predicts.
    fn loss_tokens(&self, example: &SftExample) -> Option<usize> {
        Some(example.row.scored.iter().skip(1).filter(|&&s| s).count())
    }

    fn eval_metric_names(&self) -> &'static [&'static str] {
        &["loss"]
    }

    /// The summed negative log-likelihood of the scored tokens, with their number: the loss is token-weighted.
    fn evaluate(&self, model: &LlavaNext, examples: &[(usize, &SftExample)]) -> Result<(Vec<f64>, f64)> {
        let (pass, _) = tch::no_grad(|| self.forward(model, examples, false, 0))?;
        Ok((vec![pass.nll.double_value(&[])], pass.scored as f64))
    }
}

struct RowsPass {
    /// The negative log-likelihood summed over the scored tokens.
    nll: Tensor,
    scored: i64,
    tokens: usize,
}

impl SftObjective {
    /// `train`: dropout on and a graph to backward through.
    fn forward(
        &self,
        model: &LlavaNext,
        examples: &[(usize, &SftExample)],
        train: bool,
        seed: i64,
    ) -> Result<(RowsPass, Option<Recompute>)> {
        model.adapter_switch.as_ref().expect("adapter present").set_training(train);
        let mut features = Vec::new();
        let mut groups = Vec::with_capacity(examples.len());
        for (row, (_, e)) in examples.iter().enumerate() {
            let image = match &e.image {
                Some(path) => {
                    features.push(model.image_features(&load_preprocessed(model, path)?)?);
                    Some(features.len() - 1)
                }
                None => None,
            };
            groups.push(RowGroup { rows: vec![(row, &e.row)], image, share_prefix: false });
        }
        let batch = pack(&groups, model.device())?;
        let runs: Vec<_> = batch.image_runs.iter().map(|&i| features[i].shallow_clone()).collect();
        let embeds = model.embed_inputs(&batch.ids, &runs)?;
        let (hidden, recompute) = decoder_forward(model, &embeds, &batch, train && self.checkpointing, seed);
        let sums = row_logps(model, &hidden, &batch.scored, None);
        let pass = RowsPass {
            nll: -sums.sum(Kind::Float),
            scored: batch.scored.counts.iter().sum(),
            tokens: batch.row_tokens,
        };
        Ok((pass, recompute))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_tokens_are_the_labels_the_packed_batch_scores() {
        let row =
            EncodedRow { ids: vec![1, 5, 6, 7, 8, 9, 2], scored: vec![true, false, false, true, true, false, true] };
        let example = SftExample { image: None, row: row.clone() };
        let groups = [RowGroup { rows: vec![(0, &row)], image: None, share_prefix: false }];
        let batch = pack(&groups, tch::Device::Cpu).unwrap();
        let objective = SftObjective { checkpointing: false };
        assert_eq!(objective.loss_tokens(&example), Some(batch.scored.counts[0] as usize));
        assert_eq!(objective.loss_tokens(&example), Some(3));
    }
}
