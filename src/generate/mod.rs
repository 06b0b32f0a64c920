//! Autoregressive generation: the continuous-batching engine (`engine`) that the generation commands use, the
//! static left-padded batches it replaced (`static_batch`, kept for the benchmark), and what they share: prompts,
//! settings, results and the device-side sampler.
pub mod cuda_graph;
pub mod engine;
pub mod images;
pub mod kv;
pub mod requests;
pub mod sampling;
pub mod score;
pub mod session;
pub mod static_batch;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// A prompt ready for the decoder: token ids with every image placeholder already expanded to one id per
/// image feature, and the features of its images in order.
pub struct PreparedPrompt {
    pub ids: Vec<i64>,
    pub image_features: Vec<Tensor>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 1 keeps every token.
    pub top_p: f64,
    /// 0 keeps every token (transformers' `generate` defaults to 50).
    #[serde(default)]
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { max_new_tokens: 256, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Input(format!("temperature {} must be 0 (greedy) or positive", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!("top-p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It wrote EOS.
    Eos,
    /// It wrote `max_new_tokens` tokens.
    Length,
    /// Prompt and answer filled the model's context before either.
    Context,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generated {
    pub tokens: Vec<i64>,
    pub prompt_tokens: usize,
    pub stop: StopReason,
}

/// How a row of `prompt_tokens` may generate under `max_new_tokens` in a context of `context` positions: the
/// number of tokens it may write, and why it stops when it writes them all. `None` when the prompt leaves no room.
pub fn new_token_limit(prompt_tokens: usize, max_new_tokens: usize, context: usize) -> Option<(usize, StopReason)> {
    let room = context.checked_sub(prompt_tokens).filter(|&r| r > 0)?;
    Some(if max_new_tokens <= room { (max_new_tokens, StopReason::Length) } else { (room, StopReason::Context) })
}

/// The error of a prompt that does not fit the model's context.
pub fn too_long(prompt_tokens: usize, context: usize) -> Error {
    Error::Input(format!(
        "the prompt is {prompt_tokens} tokens long (image tokens included), the model's context is {context}: shorten the prompt"
    ))
}

/// Wall-clock split of one `generate` call (the first token's logits close the prefill).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GenerationTiming {
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Replaces each image placeholder by `counts[k]` copies of it, like the Hugging Face processor does.
pub fn expand_image_tokens(ids: &[i64], image_id: i64, counts: &[usize]) -> Result<Vec<i64>> {
    let placeholders = ids.iter().filter(|&&i| i == image_id).count();
    if placeholders != counts.len() {
        return Err(Error::Input(format!(
            "the prompt has {placeholders} <image> placeholder(s) for {} image(s)",
            counts.len()
        )));
    }
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut next = counts.iter();
    for &id in ids {
        if id == image_id {
            out.extend(std::iter::repeat_n(image_id, *next.next().unwrap()));
        } else {
            out.push(id);
        }
    }
    Ok(out)
}

/// Left-pads rows to one length: ids [b, t] (padding = `pad_id`) and a mask [b, t] of real tokens.
pub fn left_pad(rows: &[&[i64]], pad_id: i64) -> (Tensor, Tensor) {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut mask = Vec::with_capacity(rows.len() * t);
    for row in rows {
        let pad = t - row.len();
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(row.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1i64, row.len())));
    }
    let shape = [rows.len() as i64, t as i64];
    (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape))
}

/// Positions that start at 0 on each row's first real token, as transformers derives them from the mask.
pub fn positions_from_mask(mask: &Tensor) -> Tensor {
    (mask.cumsum(1, Kind::Int64) - 1).clamp_min(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_each_placeholder_by_its_count() {
        let ids = [1, 5, 32000, 7, 32000, 8];
        assert_eq!(
            expand_image_tokens(&ids, 32000, &[2, 3]).unwrap(),
            vec![1, 5, 32000, 32000, 7, 32000, 32000, 32000, 8]
        );
        assert!(expand_image_tokens(&ids, 32000, &[2]).is_err());
    }

    #[test]
    fn left_padding_and_positions() {
        let (ids, mask) = left_pad(&[&[1, 2, 3], &[4]], 9);
        assert_eq!(Vec::<i64>::try_from(ids.flatten(0, 1)).unwrap(), vec![1, 2, 3, 9, 9, 4]);
        assert_eq!(Vec::<i64>::try_from(positions_from_mask(&mask).flatten(0, 1)).unwrap(), vec![0, 1, 2, 0, 0, 0]);
    }
}
