//! What the training loop needs from an objective (DPO, SFT): token rows, a step's metrics, and the
//! forward/backward over a micro-batch.
use std::path::Path;

use crate::error::Result;
use crate::image::{self, Preprocessed};
use crate::model::LlavaNext;

/// A token row for training: ids with image placeholders expanded, and which positions are scored.
#[derive(Debug, Clone)]
pub struct EncodedRow {
    pub ids: Vec<i64>,
    pub scored: Vec<bool>,
}

pub struct StepOutput {
    /// In the order of `Objective::metric_names`.
    pub metrics: Vec<f64>,
    pub tokens: usize,
}

pub trait Objective {
    type Example;
    fn metric_names(&self) -> &'static [&'static str];
    /// Tokens the model runs for this example (what a micro-batch costs).
    fn tokens(&self, example: &Self::Example) -> usize;
    /// Forward and backward over one micro-batch (gradients accumulate, the loss is multiplied by `loss_scale`).
    fn step(
        &self,
        model: &LlavaNext,
        examples: &[(usize, &Self::Example)],
        loss_scale: f64,
        seed: i64,
    ) -> Result<StepOutput>;
    /// Tokens the loss averages over (SFT: the scored tokens); `None` where the loss is not a token mean.
    fn loss_tokens(&self, _example: &Self::Example) -> Option<usize> {
        None
    }
    /// Names of the held-out metrics `evaluate` gives.
    fn eval_metric_names(&self) -> &'static [&'static str];
    /// The same forward pass without gradients and with dropout off: the metrics of `eval_metric_names` summed
    /// over the micro-batch, and the weight they average by (pairs, scored tokens).
    fn evaluate(&self, model: &LlavaNext, examples: &[(usize, &Self::Example)]) -> Result<(Vec<f64>, f64)>;
}

pub fn load_preprocessed(model: &LlavaNext, path: &Path) -> Result<Preprocessed> {
    let img = image::load_image(path, model.cfg.image.max_pixels)?;
    Ok(image::preprocess(&img, &model.cfg.image))
}
