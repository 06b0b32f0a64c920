//! STIC stage 2 objective: next-token cross-entropy on the assistant turns of LLaVA-format conversations.
use std::path::PathBuf;
use tch::Kind;

use super::dpo::token_batch;
use super::forward::{backward, decoder_forward, row_logps};
use super::trainer::{load_preprocessed, EncodedRow, Objective, StepOutput};
use crate::error::{Error, Result};
use crate::model::LlavaNext;

pub struct SftExample {
    pub image: Option<PathBuf>,
    pub row: EncodedRow,
}

pub struct SftObjective {
    pub checkpointing: bool,
    pub pad_id: i64,
}

impl Objective for SftObjective {
    type Example = SftExample;

    fn metric_names(&self) -> &'static [&'static str] {
        &["loss", "scored_tokens"]
    }

    /// The mean over all scored tokens of the micro-batch, as transformers' causal-LM loss.
    fn step(&self, model: &LlavaNext, examples: &[(usize, &SftExample)], loss_scale: f64, seed: i64) -> Result<StepOutput> {
        let rows: Vec<&EncodedRow> = examples.iter().map(|(_, e)| &e.row).collect();
        let batch = token_batch(&rows, self.pad_id, model.device());
        model.adapter_switch.as_ref().expect("adapter present").set_training(true);
        let mut features = Vec::new();
        for (_, e) in examples {
            if let Some(path) = &e.image {
                features.push(model.image_features(&load_preprocessed(model, path)?)?);
            }
        }
        let embeds = model.embed_inputs(&batch.ids, &features)?;
        let (hidden, recompute) = decoder_forward(model, &embeds, &batch.mask, self.checkpointing, seed);
        let (sums, counts) = row_logps(model, &hidden, &batch, None);
        let scored: i64 = counts.iter().sum();
        let loss = -sums.sum(Kind::Float) / scored.max(1) as f64;
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(Error::Training(format!("the loss is non-finite ({value})")));
        }
        backward(model, &(&loss * loss_scale), recompute);
        Ok(StepOutput { metrics: vec![value, scored as f64], tokens: rows.iter().map(|r| r.ids.len()).sum() })
    }
}
