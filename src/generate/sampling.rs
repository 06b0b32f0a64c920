//! The next token of each row, chosen on the device: greedy, or temperature, top-k and top-p sampling.
//!
//! Sampling is the Gumbel-max trick: the token with the largest `log p + g` among those top-k and top-p keep,
//! where `g = -ln(-ln u)` and `u` is a uniform number computed, not drawn: a hash of (seed, row seed, step,
//! token id) evaluated with integer tensor ops. A row's noise therefore depends on nothing else in the batch
//! (rows, slots, shards, resumption) and is the same on every device. The choice is an exact sample of the
//! filtered distribution, the one transformers samples from with `torch.multinomial`; the random draws differ.
use tch::{Kind, Tensor};

use super::SamplingConfig;

/// The row and step a token is drawn for.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub row_seed: u64,
    /// 0 for the first new token.
    pub step: u64,
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Three 32-bit key words per row (held in i64), from the run's seed, the row's seed and the step.
fn row_keys(seed: u64, draws: &[Draw]) -> Vec<i64> {
    draws
        .iter()
        .flat_map(|d| {
            let k = splitmix64(seed ^ splitmix64(d.row_seed ^ splitmix64(d.step)));
            let k2 = splitmix64(k);
            [(k & 0xFFFF_FFFF) as i64, (k >> 32) as i64, (k2 & 0xFFFF_FFFF) as i64]
        })
        .collect()
}

/// `x * c mod 2^32` for `x, c < 2^32` in i64 without overflow: `x` is multiplied in 16-bit halves.
fn mul32(x: &Tensor, c: i64) -> Tensor {
    let low = x.bitwise_and(0xFFFF) * c;
    let high = (x.bitwise_right_shift_tensor_scalar(16) * c).bitwise_and(0xFFFF).bitwise_left_shift_tensor_scalar(16);
    (low + high).bitwise_and(0xFFFF_FFFF)
}

/// Chris Wellons' `lowbias32` integer hash, elementwise on 32-bit values held in i64.
fn mix32(x: &Tensor) -> Tensor {
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
    let x = mul32(&x, 0x7feb_352d);
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(15));
    let x = mul32(&x, 0x846c_a68b);
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
}

/// Gumbel noise (f64) for the token ids `tokens` [rows, n] of each row's draw.
fn gumbel(tokens: &Tensor, seed: u64, draws: &[Draw]) -> Tensor {
    let keys = Tensor::from_slice(&row_keys(seed, draws)).view([draws.len() as i64, 3]).to_device(tokens.device());
    let word = |i: i64| keys.narrow(1, i, 1);
    let h1 = mix32(&mix32(&tokens.bitwise_xor_tensor(&word(0))).bitwise_xor_tensor(&word(1)));
    let h2 = mix32(&h1.bitwise_xor_tensor(&word(2)));
    let bits = h1.bitwise_left_shift_tensor_scalar(21).bitwise_or_tensor(&h2.bitwise_right_shift_tensor_scalar(11));
    let u = (bits.to_kind(Kind::Double) + 0.5) / (1u64 << 53) as f64;
    -(-u.log()).log()
}

/// The tokens top-k keeps, highest first, as (log-probabilities, ids), [rows, n]. Like transformers'
/// `TopKLogitsWarper`, a token tied with the k-th keeps its place too (then every token is listed, the others at
/// -inf).
fn top_k_candidates(logp: &Tensor, top_k: usize) -> (Tensor, Tensor) {
    let vocab = logp.size()[1];
    if top_k == 0 || top_k as i64 >= vocab {
        return logp.sort(-1, true);
    }
    let (values, ids) = logp.topk(top_k as i64, -1, true, true);
    let kth = values.narrow(1, top_k as i64 - 1, 1);
    let kept = logp.ge_tensor(&kth).sum_dim_intlist(1, false, Kind::Int64);
    if bool::try_from(kept.gt(top_k as i64).any()).unwrap_or(true) {
        return logp.masked_fill(&logp.lt_tensor(&kth), f64::NEG_INFINITY).sort(-1, true);
    }
    (values, ids)
}

/// The next token of each row of `logits` [rows, vocab] (any float dtype, on any device): the argmax when the
/// temperature is 0, else a sample after temperature, top-k and top-p (transformers' order and rules). Returns
/// the ids, [rows] i64, on the device of `logits`.
pub fn choose(logits: &Tensor, cfg: &SamplingConfig, draws: &[Draw]) -> Tensor {
    if cfg.temperature <= 0.0 {
        return logits.argmax(-1, false);
    }
    let logp = (logits.to_kind(Kind::Float) / cfg.temperature).log_softmax(-1, Kind::Float);
    let vocab = logp.size()[1];
    if (cfg.top_k == 0 || cfg.top_k as i64 >= vocab) && cfg.top_p >= 1.0 {
        // Nothing is filtered, and a token's noise depends on its id, not its rank: the same choice without the
        // full-vocabulary sort.
        let ids = Tensor::arange(vocab, (Kind::Int64, logp.device())).unsqueeze(0);
        return (logp.to_kind(Kind::Double) + gumbel(&ids, cfg.seed, draws)).argmax(-1, false);
    }
    let (mut candidates, ids) = top_k_candidates(&logp, cfg.top_k);
    if cfg.top_p < 1.0 {
        // The smallest set of the most likely tokens whose mass reaches top_p (at least one), renormalised over
        // what top-k kept, as `TopPLogitsWarper`.
        let probs = candidates.log_softmax(-1, Kind::Float).exp();
        let mass_before = probs.cumsum(-1, Kind::Float) - &probs;
        candidates = candidates.masked_fill(&mass_before.ge(cfg.top_p), f64::NEG_INFINITY);
    }
    let best = (candidates.to_kind(Kind::Double) + gumbel(&ids, cfg.seed, draws)).argmax(-1, true);
    ids.gather(1, &best, false).squeeze_dim(1)
}

/// `choose`, with the ids on the host.
pub fn choose_on_host(logits: &Tensor, cfg: &SamplingConfig, draws: &[Draw]) -> Vec<i64> {
    Vec::<i64>::try_from(choose(logits, cfg, draws).to_device(tch::Device::Cpu)).expect("i64 token ids")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_mix32(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^ (x >> 16)
    }

    #[test]
    fn the_tensor_hash_is_lowbias32() {
        let xs: Vec<i64> = vec![0, 1, 2, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 123_456_789];
        let got = Vec::<i64>::try_from(mix32(&Tensor::from_slice(&xs))).unwrap();
        let want: Vec<i64> = xs.iter().map(|&x| host_mix32(x as u32) as i64).collect();
        assert_eq!(got, want);
    }

    fn cfg(temperature: f64, top_p: f64, top_k: usize) -> SamplingConfig {
        SamplingConfig { temperature, top_p, top_k, seed: 5, ..Default::default() }
    }

    #[test]
    fn greedy_is_the_argmax() {
        let logits = Tensor::from_slice(&[0.0f32, 3.0, 1.0, 2.0, 9.0, 1.0]).view([2, 3]);
        assert_eq!(choose_on_host(&logits, &cfg(0.0, 1.0, 0), &[Draw { row_seed: 0, step: 0 }; 2]), vec![1, 1]);
    }

    #[test]
    fn a_row_draws_the_same_token_in_any_batch() {
        let logits = Tensor::randn([6, 300], (Kind::Float, tch::Device::Cpu));
        let c = cfg(1.0, 0.95, 40);
        let draws: Vec<Draw> = (0..6).map(|r| Draw { row_seed: 100 + r, step: 7 }).collect();
        let all = choose_on_host(&logits, &c, &draws);
        for r in 0..6 {
            let alone = choose_on_host(&logits.narrow(0, r as i64, 1), &c, &draws[r..r + 1]);
            assert_eq!(alone[0], all[r]);
        }
    }

    #[test]
    fn top_k_and_top_p_keep_only_their_tokens() {
        let logits = Tensor::from_slice(&[10.0f32, 9.0, 5.0, -10.0]).view([1, 4]);
        let seen = |c: &SamplingConfig| -> std::collections::BTreeSet<i64> {
            (0..400).map(|step| choose_on_host(&logits, c, &[Draw { row_seed: 1, step }])[0]).collect()
        };
        assert_eq!(seen(&cfg(1.0, 0.5, 0)), [0].into());
        assert_eq!(seen(&cfg(1.0, 0.999, 0)), [0, 1, 2].into());
        assert_eq!(seen(&cfg(1.0, 1.0, 2)), [0, 1].into());
        // top-p counts the mass renormalised over what top-k kept: 0 alone holds 73 % of {0, 1}
        assert_eq!(seen(&cfg(1.0, 0.7, 2)), [0].into());
        assert_eq!(seen(&cfg(1.0, 0.8, 2)), [0, 1].into());
    }

    #[test]
    fn ties_with_the_kth_token_stay_in_top_k() {
        let logits = Tensor::from_slice(&[4.0f32, 2.0, 2.0, 2.0, -5.0]).view([1, 5]);
        let seen: std::collections::BTreeSet<i64> =
            (0..400).map(|step| choose_on_host(&logits, &cfg(2.0, 1.0, 2), &[Draw { row_seed: 3, step }])[0]).collect();
        assert_eq!(seen, [0, 1, 2, 3].into());
    }

    #[test]
    fn without_filters_the_unsorted_choice_is_the_sorted_one() {
        let logits = Tensor::randn([5, 1000], (Kind::Float, tch::Device::Cpu));
        let draws: Vec<Draw> = (0..5).map(|r| Draw { row_seed: 9 + r, step: 3 }).collect();
        for c in [cfg(1.0, 1.0, 0), cfg(0.7, 1.0, 5000)] {
            let logp = (&logits / c.temperature).log_softmax(-1, Kind::Float);
            let (sorted, ids) = logp.sort(-1, true);
            let best = (sorted.to_kind(Kind::Double) + gumbel(&ids, c.seed, &draws)).argmax(-1, true);
            let want = Vec::<i64>::try_from(ids.gather(1, &best, false).squeeze_dim(1)).unwrap();
            assert_eq!(choose_on_host(&logits, &c, &draws), want);
        }
    }

    #[test]
    fn samples_follow_the_softmax() {
        // p = softmax([0, ln 2, ln 3]) = 1/6, 2/6, 3/6; 6,000 draws
        let logits = Tensor::from_slice(&[0.0f32, 2f32.ln(), 3f32.ln()]).view([1, 3]).repeat([6000, 1]);
        let draws: Vec<Draw> = (0..6000).map(|r| Draw { row_seed: r, step: 0 }).collect();
        let tokens = choose_on_host(&logits, &cfg(1.0, 1.0, 0), &draws);
        for (token, p) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            let freq = tokens.iter().filter(|&&t| t == token).count() as f64 / 6000.0;
            assert!((freq - p).abs() < 0.025, "token {token}: {freq} vs {p}");
        }
    }
}
