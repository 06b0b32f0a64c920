//! The decoder of Mistral and Llama (one implementation, chosen by the config): RMSNorm, rotary embeddings,
//! multi-head or grouped-query attention, SwiGLU, and Mistral's optional sliding window.
use tch::{Kind, Tensor};

use super::attention::SegmentedAttention;
use super::config::TextConfig;
use super::linear::{Linear, RmsNorm};
use super::weights::Vb;

/// Where attention keeps the keys and values of the tokens it has seen.
pub trait KvStore {
    /// Stores `k`, `v` [b, kv_heads, t, head_dim] of `layer` after what the store holds for it and returns the keys
    /// and values to attend to, [b, kv_heads, keys, head_dim].
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor);
}

/// Keys and values of the tokens seen so far, per layer, in buffers [b, kv_heads, capacity, head_dim] that grow
/// by whole chunks: appending a decode step writes one slot instead of copying the whole cache.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
}

const KV_CACHE_CHUNK: i64 = 256;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| None).collect(), len: 0 }
    }

    pub fn seen(&self) -> i64 {
        self.len
    }
}

impl KvStore for KvCache {
    /// Writes `k`, `v` after the cached tokens of `layer` and returns views of all of them. The token count
    /// advances once the last layer has appended.
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let (start, t) = (self.len, k.size()[2]);
        let needed = start + t;
        let grown = |old: Option<&Tensor>, new: &Tensor| {
            let mut shape = new.size();
            shape[2] = (needed + KV_CACHE_CHUNK - 1) / KV_CACHE_CHUNK * KV_CACHE_CHUNK;
            let buffer = Tensor::empty(shape.as_slice(), (new.kind(), new.device()));
            if let Some(old) = old {
                buffer.narrow(2, 0, start).copy_(&old.narrow(2, 0, start));
            }
            buffer
        };
        let (kb, vb) = match self.layers[layer].take() {
            Some((kb, vb)) if kb.size()[2] >= needed => (kb, vb),
            old => (grown(old.as_ref().map(|o| &o.0), &k), grown(old.as_ref().map(|o| &o.1), &v)),
        };
        kb.narrow(2, start, t).copy_(&k);
        vb.narrow(2, start, t).copy_(&v);
        let views = (kb.narrow(2, 0, needed), vb.narrow(2, 0, needed));
        self.layers[layer] = Some((kb, vb));
        if layer + 1 == self.layers.len() {
            self.len = needed;
        }
        views
    }
}

/// Which keys each query may attend to.
pub enum AttnMask {
    /// Plain causal attention (lets libtorch use its fused kernel): no cache, no left padding, no window in reach.
    /// Right padding needs no mask: under causality real tokens never see the padding after them.
    Causal,
    /// Every query sees every key (a single new token over a cache without padding or window).
    Unmasked,
    /// Boolean [batch, 1, queries, keys], true = attend.
    Explicit(Tensor),
    /// A packed sequence (batch 1) of rows and shared prefixes, one fused call per segment.
    Segments(SegmentedAttention),
}

/// The attention mask for `num_queries` queries starting at sequence index `first_query`, over keys
/// `key_is_token` [b, keys] (0 = padding): causal over sequence indices, padding hidden, keys further back than
/// the sliding window hidden. Each query may always see itself, so that rows of left padding stay finite
/// instead of turning into NaN that would leak through the values.
pub fn attention_mask(
    key_is_token: &Tensor,
    first_query: i64,
    num_queries: i64,
    sliding_window: Option<usize>,
) -> AttnMask {
    let num_keys = key_is_token.size()[1];
    let window_out_of_reach = sliding_window.is_none_or(|w| w as i64 >= num_keys);
    let no_left_padding = bool::try_from(key_is_token.select(1, 0).ne(0).all()).unwrap_or(false);
    if first_query == 0 && window_out_of_reach && no_left_padding {
        return AttnMask::Causal;
    }
    if num_queries == 1
        && first_query + 1 == num_keys
        && window_out_of_reach
        && bool::try_from(key_is_token.ne(0).all()).unwrap_or(false)
    {
        return AttnMask::Unmasked;
    }
    let device = key_is_token.device();
    let q = Tensor::arange_start(first_query, first_query + num_queries, (Kind::Int64, device)).view([-1, 1]);
    let k = Tensor::arange(num_keys, (Kind::Int64, device)).view([1, -1]);
    let mut allowed = k.le_tensor(&q);
    if let Some(w) = sliding_window {
        allowed = allowed.logical_and(&(&q - &k).lt(w as i64));
    }
    let allowed = allowed.unsqueeze(0).logical_and(&key_is_token.to_kind(Kind::Bool).unsqueeze(1));
    AttnMask::Explicit(allowed.logical_or(&k.eq_tensor(&q).unsqueeze(0)).unsqueeze(1))
}

pub struct Rotary {
    inv_freq: Tensor,
}

impl Rotary {
    pub fn new(cfg: &TextConfig, device: tch::Device) -> Self {
        let dim = cfg.head_dim() as i64;
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim as f64;
        let inv_freq = Tensor::from(cfg.rope_theta).to_device(device).to_kind(Kind::Float).pow(&exponents).reciprocal();
        Rotary { inv_freq }
    }

    /// cos and sin for positions [b, t], each [b, 1, t, head_dim] in `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos().to_kind(kind).unsqueeze(1), emb.sin().to_kind(kind).unsqueeze(1))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[x.narrow(3, half, half).neg(), x.narrow(3, 0, half)], 3)
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(vb: &Vb, cfg: &TextConfig) -> Self {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        Attention {
            q_proj: Linear::new(&vb.pp("q_proj"), d, cfg.num_attention_heads * hd, false),
            k_proj: Linear::new(&vb.pp("k_proj"), d, cfg.num_key_value_heads * hd, false),
            v_proj: Linear::new(&vb.pp("v_proj"), d, cfg.num_key_value_heads * hd, false),
            o_proj: Linear::new(&vb.pp("o_proj"), cfg.num_attention_heads * hd, d, false),
            num_heads: cfg.num_attention_heads as i64,
            num_kv_heads: cfg.num_key_value_heads as i64,
            head_dim: hd as i64,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &AttnMask,
        cache: Option<(&mut dyn KvStore, usize)>,
    ) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let split = |y: Tensor, heads: i64| y.view([b, t, heads, self.head_dim]).transpose(1, 2);
        let q = apply_rotary(&split(self.q_proj.forward(x), self.num_heads), &rope.0, &rope.1);
        let k = apply_rotary(&split(self.k_proj.forward(x), self.num_kv_heads), &rope.0, &rope.1);
        let v = split(self.v_proj.forward(x), self.num_kv_heads);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let gqa = self.num_heads != self.num_kv_heads;
        let out = match mask {
            AttnMask::Causal => Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, scale, gqa),
            AttnMask::Unmasked => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, scale, gqa)
            }
            AttnMask::Explicit(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, gqa),
            AttnMask::Segments(s) => s.attend(&q, &k, &v, scale, gqa),
        };
        self.o_proj.forward(&out.transpose(1, 2).reshape([b, t, self.num_heads * self.head_dim]))
    }
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    pub self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    fn new(vb: &Vb, cfg: &TextConfig) -> Self {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        DecoderLayer {
            input_layernorm: RmsNorm::new(&vb.pp("input_layernorm"), d, cfg.rms_norm_eps),
            self_attn: Attention::new(&vb.pp("self_attn"), cfg),
            post_attention_layernorm: RmsNorm::new(&vb.pp("post_attention_layernorm"), d, cfg.rms_norm_eps),
            mlp: Mlp {
                gate_proj: Linear::new(&vb.pp("mlp.gate_proj"), d, i, false),
                up_proj: Linear::new(&vb.pp("mlp.up_proj"), d, i, false),
                down_proj: Linear::new(&vb.pp("mlp.down_proj"), i, d, false),
            },
        }
    }

    /// The seven linear layers with their module paths relative to the layer.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &AttnMask,
        cache: Option<(&mut dyn KvStore, usize)>,
    ) -> Tensor {
        let h = x + self.self_attn.forward(&self.input_layernorm.forward(x), rope, mask, cache);
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }
}

pub struct DecoderModel {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    pub lm_head: Linear,
    pub rotary: Rotary,
    pub cfg: TextConfig,
}

impl DecoderModel {
    /// `vb` points at `language_model`.
    pub fn new(vb: &Vb, cfg: &TextConfig) -> Self {
        let m = vb.pp("model");
        let embed_tokens = m.get(&[cfg.vocab_size as i64, cfg.hidden_size as i64], "embed_tokens.weight");
        let lm_head = if cfg.tie_word_embeddings && !vb.contains("lm_head.weight") {
            Linear { weight: embed_tokens.shallow_clone(), bias: None, lora: None }
        } else {
            Linear::new(&vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)
        };
        DecoderModel {
            layers: (0..cfg.num_hidden_layers).map(|i| DecoderLayer::new(&m.pp(format!("layers.{i}")), cfg)).collect(),
            norm: RmsNorm::new(&m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps),
            rotary: Rotary::new(cfg, vb.device()),
            embed_tokens,
            lm_head,
            cfg: cfg.clone(),
        }
    }

    /// Token embeddings; ids outside the vocabulary (padding, image placeholders) embed as id 0 and are
    /// expected to be masked or overwritten by the caller.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        let vocab = self.embed_tokens.size()[0];
        let safe = ids.where_scalarother(&ids.lt(vocab).logical_and(&ids.ge(0)), 0);
        Tensor::embedding(&self.embed_tokens, &safe, -1, false, false)
    }

    /// Runs the decoder over `embeds` [b, t, d] at `positions` [b, t]; `key_is_token` [b, cached + t] marks real
    /// tokens (not padding). Returns the final-normed hidden states.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        key_is_token: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let t = embeds.size()[1];
        let first = cache.as_ref().map_or(0, |c| c.seen());
        let mask = attention_mask(key_is_token, first, t, self.cfg.sliding_window);
        self.forward_with_mask(embeds, positions, &mask, cache.map(|c| c as &mut dyn KvStore))
    }

    /// The decoder over `embeds` [b, t, d] at `positions` [b, t] with the caller's attention mask and key/value
    /// store (the generation engine's slots). Returns the final-normed hidden states.
    pub fn forward_with_mask(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: &AttnMask,
        mut cache: Option<&mut dyn KvStore>,
    ) -> Tensor {
        let rope = self.rotary.cos_sin(positions, embeds.kind());
        let mut h = embeds.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let store: Option<(&mut dyn KvStore, usize)> = match cache.as_mut() {
                Some(c) => Some((&mut **c, i)),
                None => None,
            };
            h = layer.forward(&h, &rope, mask, store);
        }
        self.norm.forward(&h)
    }

    /// Every linear layer of the decoder stack (not `lm_head`) with its module path under `language_model`.
    pub fn decoder_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, linear) in layer.linears_mut() {
                out.push((format!("language_model.model.layers.{i}.{name}"), linear));
            }
        }
        out
    }

    pub fn norm(&self) -> &RmsNorm {
        &self.norm
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(hidden)
    }
}
