//! Log-probabilities of a response under the model, and the raw logits of a whole input.
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::generate::PreparedPrompt;
use crate::model::LlavaNext;
use crate::text::tokenizer::IMAGE_TOKEN_INDEX;

/// Logits [t, vocab] in f32 for every position of a single prompt (image positions expanded in place).
pub fn full_logits(model: &LlavaNext, prompt: &PreparedPrompt) -> Result<Tensor> {
    let ctx = model.cfg.text.max_position_embeddings;
    if prompt.ids.len() > ctx {
        return Err(Error::Input(format!(
            "the text is {} tokens long (image tokens included), the model's context is {ctx}: shorten the prompt or the response",
            prompt.ids.len()
        )));
    }
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

/// log p(ids[j] | ids[..j]) for every text position j >= `first` (image positions are not tokens and are
/// skipped; logits as returned by [`full_logits`]).
pub fn token_logprobs(logits: &Tensor, ids: &[i64], first: usize) -> Vec<f64> {
    let scored: Vec<usize> = (first.max(1)..ids.len()).filter(|&j| ids[j] != IMAGE_TOKEN_INDEX).collect();
    if scored.is_empty() {
        return Vec::new();
    }
    let device = logits.device();
    let rows = Tensor::from_slice(&scored.iter().map(|&j| j as i64 - 1).collect::<Vec<_>>()).to_device(device);
    let targets = Tensor::from_slice(&scored.iter().map(|&j| ids[j]).collect::<Vec<_>>()).to_device(device).view([-1, 1]);
    let predicting = logits.index_select(0, &rows).log_softmax(-1, Kind::Float);
    Vec::<f64>::try_from(predicting.gather(1, &targets, false).squeeze_dim(1).to_kind(Kind::Double).to_device(tch::Device::Cpu))
        .expect("f64 values")
}
