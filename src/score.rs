//! Log-probabilities of a response under the model, and the raw logits of a whole input.
use tch::{Kind, Tensor};

use crate::generate::PreparedPrompt;
use crate::model::LlavaNext;
use crate::error::Result;

/// Logits [t, vocab] in f32 for every position of a single prompt (image tokens expanded in place).
pub fn full_logits(model: &LlavaNext, prompt: &PreparedPrompt) -> Result<Tensor> {
    tch::no_grad(|| {
        let device = model.device();
        let ids = Tensor::from_slice(&prompt.ids).view([1, -1]).to_device(device);
        let mask = ids.ones_like();
        let positions = crate::generate::positions_from_mask(&mask);
        let embeds = model.embed_inputs(&ids, &prompt.image_features)?;
        let hidden = model.language_model.forward(&embeds, &positions, &mask, None);
        Ok(model.language_model.logits(&hidden).squeeze_dim(0).to_kind(Kind::Float))
    })
}

/// log p(ids[j] | ids[..j]) for every j >= `first` (logits as returned by [`full_logits`]).
pub fn token_logprobs(logits: &Tensor, ids: &[i64], first: usize) -> Vec<f64> {
    if first >= ids.len() || first == 0 {
        return Vec::new();
    }
    let n = (ids.len() - first) as i64;
    let predicting = logits.narrow(0, first as i64 - 1, n).log_softmax(-1, Kind::Float);
    let targets = Tensor::from_slice(&ids[first..]).to_device(logits.device()).view([-1, 1]);
    Vec::<f64>::try_from(predicting.gather(1, &targets, false).squeeze_dim(1).to_kind(Kind::Double).to_device(tch::Device::Cpu))
        .expect("f64 values")
}
