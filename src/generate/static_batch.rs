//! Static batches: the prompts are left-padded to one length, prefilled together and decoded together until the
//! last row stops (what `stic` did before the engine; `stic generate --static-batching` keeps it for the
//! benchmark).
use tch::{Kind, Tensor};

use super::sampling::{choose_on_host, Draw};
use super::{
    left_pad, new_token_limit, positions_from_mask, too_long, Generated, GenerationTiming, PreparedPrompt,
    SamplingConfig, StopReason,
};
use crate::error::Result;
use crate::model::decoder::KvCache;
use crate::model::LlavaNext;

/// Generates for a batch of prompts; row `i` writes at most `max_new_tokens[i]` tokens and draws its samples
/// with `row_seeds[i]`, so its output does not depend on which other rows share the batch.
pub fn generate(
    model: &LlavaNext,
    prompts: &[PreparedPrompt],
    row_seeds: &[u64],
    max_new_tokens: &[usize],
    cfg: &SamplingConfig,
    stop_ids: &[i64],
    pad_id: i64,
) -> Result<(Vec<Generated>, GenerationTiming)> {
    cfg.validate()?;
    let ctx = model.cfg.text.max_position_embeddings;
    let mut limits = Vec::with_capacity(prompts.len());
    for (p, &max_new) in prompts.iter().zip(max_new_tokens) {
        limits.push(new_token_limit(p.ids.len(), max_new, ctx).ok_or_else(|| too_long(p.ids.len(), ctx))?);
    }
    let device = model.device();
    let b = prompts.len();
    let steps = limits.iter().map(|l| l.0).max().unwrap_or(0);
    let rows: Vec<&[i64]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let (ids, mask) = left_pad(&rows, pad_id);
    let (ids, mut mask) = (ids.to_device(device), mask.to_device(device));
    let features: Vec<Tensor> =
        prompts.iter().flat_map(|p| p.image_features.iter().map(|f| f.shallow_clone())).collect();
    let mut outputs: Vec<Generated> = prompts
        .iter()
        .map(|p| Generated { tokens: Vec::new(), prompt_tokens: p.ids.len(), stop: StopReason::Length })
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
        for step in 0..steps {
            let active: Vec<usize> = (0..b).filter(|&r| !done[r]).collect();
            let logits = lm.logits(&last_hidden).squeeze_dim(1);
            let index = Tensor::from_slice(&active.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(device);
            let draws: Vec<Draw> = active.iter().map(|&r| Draw { row_seed: row_seeds[r], step: step as u64 }).collect();
            let chosen = choose_on_host(&logits.index_select(0, &index), cfg, &draws);
            if step == 0 {
                timing.prefill_seconds = started.elapsed().as_secs_f64();
            }
            let mut next = vec![pad_id; b];
            for (&row, token) in active.iter().zip(chosen) {
                outputs[row].tokens.push(token);
                next[row] = token;
                if stop_ids.contains(&token) {
                    outputs[row].stop = StopReason::Eos;
                    done[row] = true;
                } else if outputs[row].tokens.len() == limits[row].0 {
                    outputs[row].stop = limits[row].1;
                    done[row] = true;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let next = Tensor::from_slice(&next).view([b as i64, 1]).to_device(device);
            positions = positions.narrow(1, positions.size()[1] - 1, 1) + 1;
            mask = Tensor::cat(&[mask, Tensor::ones([b as i64, 1], (Kind::Int64, device))], 1);
            last_hidden = lm.forward(&lm.embed(&next), &positions, &mask, Some(&mut cache));
        }
        Ok(())
    })?;
    timing.decode_seconds = started.elapsed().as_secs_f64() - timing.prefill_seconds;
    Ok((outputs, timing))
}
