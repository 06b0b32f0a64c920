//! Training forward passes over packed micro-batches (see `packing`), with optional activation checkpointing per
//! decoder layer: tch has no `torch.utils.checkpoint`, so the layers run without a graph, their inputs are kept,
//! and the backward pass recomputes each layer from its input and feeds it the gradient from the layer above.
use tch::{Kind, Tensor};

use super::packing::{PackedBatch, ScoredTokens};
use crate::model::decoder::AttnMask;
use crate::model::LlavaNext;

/// Dropout masks are drawn from a generator reseeded before each layer, so that a recomputed layer sees the same
/// masks as its first run and a resumed run the same as an uninterrupted one.
fn seed_layer(base_seed: i64, layer: usize) {
    tch::manual_seed(base_seed.wrapping_mul(1_000_003).wrapping_add(layer as i64));
}

/// What the backward pass needs to recompute the layers.
pub struct Recompute {
    embeds: Tensor,
    layer_inputs: Vec<Tensor>,
    top: Tensor,
    rope: (Tensor, Tensor),
    attn: AttnMask,
    seed: i64,
}

/// Runs the decoder over the packed `embeds` [1, n, d] and returns the final-normed hidden states (with a graph
/// to whatever requires grad) and, when checkpointing, what `backward` needs.
pub fn decoder_forward(
    model: &LlavaNext,
    embeds: &Tensor,
    batch: &PackedBatch,
    checkpointing: bool,
    seed: i64,
) -> (Tensor, Option<Recompute>) {
    let lm = &model.language_model;
    let attn = AttnMask::Segments(batch.layout.attention(lm.cfg.sliding_window, embeds.device()));
    let rope = lm.rotary.cos_sin(&batch.positions, embeds.kind());
    if !checkpointing {
        let mut h = embeds.shallow_clone();
        for (i, layer) in lm.layers.iter().enumerate() {
            seed_layer(seed, i);
            h = layer.forward(&h, &rope, &attn, None);
        }
        return (lm.norm().forward(&h), None);
    }
    let mut layer_inputs = Vec::with_capacity(lm.layers.len());
    let mut h = embeds.detach();
    tch::no_grad(|| {
        for (i, layer) in lm.layers.iter().enumerate() {
            layer_inputs.push(h.shallow_clone());
            seed_layer(seed, i);
            h = layer.forward(&h, &rope, &attn, None);
        }
    });
    let top = h.set_requires_grad(true);
    let hidden = lm.norm().forward(&top);
    (hidden, Some(Recompute { embeds: embeds.shallow_clone(), layer_inputs, top, rope, attn, seed }))
}

/// Back-propagates `loss` through the decoder, recomputing layers when the forward pass was checkpointed.
pub fn backward(model: &LlavaNext, loss: &Tensor, recompute: Option<Recompute>) {
    let Some(r) = recompute else {
        loss.backward();
        return;
    };
    loss.backward();
    let mut grad = r.top.grad();
    for (i, layer) in model.language_model.layers.iter().enumerate().rev() {
        let input = r.layer_inputs[i].detach().set_requires_grad(true);
        seed_layer(r.seed, i);
        let out = layer.forward(&input, &r.rope, &r.attn, None);
        (out * &grad).sum(Kind::Float).backward();
        grad = input.grad();
    }
    if r.embeds.requires_grad() {
        (&r.embeds * grad).sum(Kind::Float).backward();
    }
}

/// Summed log-probabilities of the scored tokens of each row, [rows].
/// Rows flagged in `own_top_rows` are scored as the official STIC code scores rejected responses (a quirk kept
/// behind a flag): with the log-probability of the model's own top-1 token, or its top-2 where top-1 is the label.
pub fn row_logps(model: &LlavaNext, hidden: &Tensor, scored: &ScoredTokens, own_top_rows: Option<&Tensor>) -> Tensor {
    let prev = hidden.squeeze_dim(0).index_select(0, &scored.prev);
    let logp = model.language_model.logits(&prev).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    let mut picked = logp.gather(1, &scored.label.unsqueeze(1), false).squeeze_dim(1);
    if let Some(flags) = own_top_rows {
        let (values, indices) = logp.topk(2, -1, true, true);
        let top1_is_label = indices.select(1, 0).eq_tensor(&scored.label);
        let own_top = values.select(1, 1).where_self(&top1_is_label, &values.select(1, 0));
        picked = own_top.where_self(&flags.index_select(0, &scored.row), &picked);
    }
    let rows = scored.counts.len() as i64;
    Tensor::zeros([rows], (Kind::Float, hidden.device())).index_add(0, &scored.row, &picked)
}
