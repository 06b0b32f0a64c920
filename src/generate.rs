//! Batched autoregressive generation with a KV cache: left padding, per-row stop, greedy or top-p sampling.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::mistral::KvCache;
use crate::model::LlavaNext;

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
    pub top_p: f64,
    /// Sample among the `top_k` most likely tokens only (before top-p, as transformers); 0 means no limit.
    #[serde(default)]
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { max_new_tokens: 256, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generated {
    pub tokens: Vec<i64>,
    pub prompt_tokens: usize,
    /// True when the row ended with EOS, false when it hit `max_new_tokens`.
    pub stopped_at_eos: bool,
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

/// Chooses the next token from one row of logits. Sampling uses the Gumbel-max trick over the top-p nucleus:
/// unlike walking a cumulative sum over the vocabulary, its choice does not move when the probabilities change
/// in their last bits, so a row samples the same tokens whichever batch it runs in.
fn choose(logits: &Tensor, cfg: &SamplingConfig, rng: &mut ChaCha8Rng) -> i64 {
    if cfg.temperature <= 0.0 {
        return logits.argmax(-1, false).int64_value(&[]);
    }
    let logp = (logits.to_kind(Kind::Double) / cfg.temperature).log_softmax(-1, Kind::Double);
    let logp: Vec<f64> = Vec::try_from(&logp).expect("f64 log-probabilities");
    let mut order: Vec<usize> = (0..logp.len()).collect();
    let descending = |a: &usize, b: &usize| logp[*b].total_cmp(&logp[*a]);
    let mut total = 1.0;
    if cfg.top_k > 0 && cfg.top_k < order.len() {
        order.select_nth_unstable_by(cfg.top_k - 1, descending);
        order.truncate(cfg.top_k);
        total = order.iter().map(|&i| logp[i].exp()).sum();
    }
    order.sort_by(descending);
    // The smallest prefix whose mass reaches top_p (at least one token), as transformers' TopPLogitsWarper, over
    // the probabilities renormalised after the top-k cut.
    let mut kept = 0;
    let mut mass = 0.0f64;
    for &i in &order {
        kept += 1;
        mass += logp[i].exp() / total;
        if mass >= cfg.top_p {
            break;
        }
    }
    let mut nucleus = order[..kept].to_vec();
    nucleus.sort_unstable();
    let gumbel: Vec<f64> = (0..logp.len()).map(|_| -(-(rng.random::<f64>().max(f64::MIN_POSITIVE)).ln()).ln()).collect();
    let best = nucleus.iter().copied().max_by(|&a, &b| (logp[a] + gumbel[a]).total_cmp(&(logp[b] + gumbel[b]))).expect("nucleus");
    best as i64
}

/// Generates for a batch of prompts. Each row samples from its own generator seeded with `cfg.seed` and its
/// `row_seeds` entry, so a row's output does not depend on which other rows share its batch.
pub fn generate(model: &LlavaNext, prompts: &[PreparedPrompt], row_seeds: &[u64], cfg: &SamplingConfig, eos_id: i64, pad_id: i64) -> Result<(Vec<Generated>, GenerationTiming)> {
    let ctx = model.cfg.text.max_position_embeddings;
    if let Some(long) = prompts.iter().find(|p| p.ids.len() >= ctx) {
        return Err(Error::Input(format!(
            "the prompt is {} tokens long (image tokens included), the model's context is {ctx}: shorten the prompt",
            long.ids.len()
        )));
    }
    let device = model.device();
    let b = prompts.len();
    let max_new = prompts.iter().map(|p| cfg.max_new_tokens.min(ctx - p.ids.len())).max().unwrap_or(0);
    let rows: Vec<&[i64]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let (ids, mask) = left_pad(&rows, pad_id);
    let (ids, mut mask) = (ids.to_device(device), mask.to_device(device));
    let features: Vec<Tensor> = prompts.iter().flat_map(|p| p.image_features.iter().map(|f| f.shallow_clone())).collect();
    let mut rngs: Vec<ChaCha8Rng> = row_seeds.iter().map(|&s| ChaCha8Rng::seed_from_u64(cfg.seed ^ s.wrapping_mul(0x9E37_79B9_7F4A_7C15))).collect();
    let mut outputs: Vec<Generated> = prompts
        .iter()
        .map(|p| Generated { tokens: Vec::new(), prompt_tokens: p.ids.len(), stopped_at_eos: false })
        .collect();
    let started = std::time::Instant::now();
    let mut timing = GenerationTiming::default();
    tch::no_grad(|| -> Result<()> {
        let lm = &model.language_model;
        let mut cache = KvCache::new(lm.layers.len());
        let mut positions = positions_from_mask(&mask);
        let embeds = model.embed_inputs(&ids, &features)?;
        let hidden = lm.forward(&embeds, &positions, &mask, Some(&mut cache));
        let mut last_hidden = hidden.narrow(1, hidden.size()[1] - 1, 1);
        let mut done = vec![false; b];
        for step in 0..max_new {
            let logits = lm.logits(&last_hidden).squeeze_dim(1).to_kind(Kind::Float).to_device(tch::Device::Cpu);
            if step == 0 {
                timing.prefill_seconds = started.elapsed().as_secs_f64();
            }
            let mut next = vec![pad_id; b];
            for row in 0..b {
                if done[row] || step >= cfg.max_new_tokens.min(ctx - outputs[row].prompt_tokens) {
                    done[row] = true;
                    continue;
                }
                let token = choose(&logits.get(row as i64), cfg, &mut rngs[row]);
                outputs[row].tokens.push(token);
                next[row] = token;
                if token == eos_id {
                    outputs[row].stopped_at_eos = true;
                    done[row] = true;
                }
            }
            if done.iter().all(|&d| d) || step + 1 == max_new {
                break;
            }
            let next = Tensor::from_slice(&next).view([b as i64, 1]).to_device(device);
            positions = positions.narrow(1, positions.size()[1] - 1, 1) + 1;
            mask = Tensor::cat(&[mask, Tensor::ones([b as i64, 1], (Kind::Int64, device))], 1);
            let embeds = lm.embed(&next);
            last_hidden = lm.forward(&embeds, &positions, &mask, Some(&mut cache));
        }
        Ok(())
    })?;
    timing.decode_seconds = started.elapsed().as_secs_f64() - timing.prefill_seconds;
    Ok((outputs, timing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_each_placeholder_by_its_count() {
        let ids = [1, 5, 32000, 7, 32000, 8];
        assert_eq!(expand_image_tokens(&ids, 32000, &[2, 3]).unwrap(), vec![1, 5, 32000, 32000, 7, 32000, 32000, 32000, 8]);
        assert!(expand_image_tokens(&ids, 32000, &[2]).is_err());
    }

    #[test]
    fn left_padding_and_positions() {
        let (ids, mask) = left_pad(&[&[1, 2, 3], &[4]], 9);
        assert_eq!(Vec::<i64>::try_from(ids.flatten(0, 1)).unwrap(), vec![1, 2, 3, 9, 9, 4]);
        assert_eq!(Vec::<i64>::try_from(positions_from_mask(&mask).flatten(0, 1)).unwrap(), vec![0, 1, 2, 0, 0, 0]);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = Tensor::from_slice(&[10.0f32, 9.0, -10.0, -10.0]);
        let cfg = SamplingConfig { temperature: 1.0, top_p: 0.5, ..Default::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..50 {
            assert_eq!(choose(&logits, &cfg, &mut rng), 0);
        }
        let cfg = SamplingConfig { temperature: 1.0, top_p: 0.999, ..Default::default() };
        let seen: std::collections::HashSet<i64> = (0..200).map(|_| choose(&logits, &cfg, &mut rng)).collect();
        assert_eq!(seen, [0, 1].into_iter().collect());
    }

    #[test]
    fn top_k_keeps_the_k_most_likely_tokens() {
        let logits = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 2.5, -1.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let sample = |cfg: &SamplingConfig, rng: &mut ChaCha8Rng| (0..400).map(|_| choose(&logits, cfg, rng)).collect::<std::collections::HashSet<i64>>();
        let top1 = SamplingConfig { temperature: 5.0, top_k: 1, ..Default::default() };
        assert_eq!(sample(&top1, &mut rng), [1].into_iter().collect());
        let top3 = SamplingConfig { temperature: 5.0, top_k: 3, ..Default::default() };
        assert_eq!(sample(&top3, &mut rng), [1, 2, 3].into_iter().collect());
        let unlimited = SamplingConfig { temperature: 5.0, top_k: 0, ..Default::default() };
        assert_eq!(sample(&unlimited, &mut rng).len(), 5);
        // top-p applies to the renormalised top-k mass: of the top 2 (p ∝ e^3, e^2.5), 0.6 needs only the first.
        let both = SamplingConfig { temperature: 1.0, top_k: 2, top_p: 0.6, ..Default::default() };
        assert_eq!(sample(&both, &mut rng), [1].into_iter().collect());
    }
}
