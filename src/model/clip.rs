//! CLIP ViT vision tower (pre-LN transformer), as transformers' `CLIPVisionModel`.
use std::path::Path;
use tch::{Device, Kind, Tensor};

use super::config::{LlavaConfig, VisionConfig};
use super::linear::{LayerNorm, Linear};
use super::llava_next::complete_vision_config;
use super::weights::{Checkpoint, Vb, WeightSource};
use crate::error::Result;
use crate::image::ImageConfig;

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: i64,
    head_dim: i64,
}

impl ClipAttention {
    fn new(vb: &Vb, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        ClipAttention {
            q_proj: Linear::new(&vb.pp("q_proj"), d, d, true),
            k_proj: Linear::new(&vb.pp("k_proj"), d, d, true),
            v_proj: Linear::new(&vb.pp("v_proj"), d, d, true),
            out_proj: Linear::new(&vb.pp("out_proj"), d, d, true),
            num_heads: cfg.num_attention_heads as i64,
            head_dim: (d / cfg.num_attention_heads) as i64,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, d) = x.size3().unwrap();
        let heads = |y: Tensor| y.view([b, t, self.num_heads, self.head_dim]).transpose(1, 2);
        let q = heads(self.q_proj.forward(x));
        let k = heads(self.k_proj.forward(x));
        let v = heads(self.v_proj.forward(x));
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, scale, false);
        self.out_proj.forward(&out.transpose(1, 2).reshape([b, t, d]))
    }
}

struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    quick_gelu: bool,
}

impl ClipMlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.fc1.forward(x);
        let h = if self.quick_gelu { &h * (&h * 1.702).sigmoid() } else { h.gelu("none") };
        self.fc2.forward(&h)
    }
}

struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: &Vb, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        ClipEncoderLayer {
            layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), d, cfg.layer_norm_eps),
            self_attn: ClipAttention::new(&vb.pp("self_attn"), cfg),
            layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), d, cfg.layer_norm_eps),
            mlp: ClipMlp {
                fc1: Linear::new(&vb.pp("mlp.fc1"), d, cfg.intermediate_size, true),
                fc2: Linear::new(&vb.pp("mlp.fc2"), cfg.intermediate_size, d, true),
                quick_gelu: cfg.hidden_act == "quick_gelu",
            },
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        &x + self.mlp.forward(&self.layer_norm2.forward(&x))
    }
}

/// The module path of the CLIP vision model (canonical, llava-hf older naming).
pub const VISION_MODEL: &str = "vision_tower.vision_model";

/// The linear layers of a CLIP encoder layer, relative to it.
pub const LAYER_LINEARS: [&str; 6] =
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"];

pub struct ClipVisionTower {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    patch_size: i64,
}

impl ClipVisionTower {
    /// `vb` points at `vision_tower.vision_model`; only the first `num_layers` encoder layers are built, since
    /// LLaVA reads an inner layer and never needs the rest.
    pub fn new(vb: &Vb, cfg: &VisionConfig, num_layers: usize) -> Self {
        let d = cfg.hidden_size as i64;
        let p = cfg.patch_size as i64;
        let num_positions = (cfg.image_size as i64 / p).pow(2) + 1;
        let emb = vb.pp("embeddings");
        ClipVisionTower {
            patch_embedding: emb.get(&[d, 3, p, p], "patch_embedding.weight"),
            class_embedding: emb.get(&[d], "class_embedding"),
            position_embedding: emb.get(&[num_positions, d], "position_embedding.weight"),
            pre_layrnorm: LayerNorm::new(&vb.pp("pre_layrnorm"), cfg.hidden_size, cfg.layer_norm_eps),
            layers: (0..num_layers)
                .map(|i| ClipEncoderLayer::new(&vb.pp(format!("encoder.layers.{i}")), cfg))
                .collect(),
            patch_size: p,
        }
    }

    /// Every linear layer of the built encoder layers with its module path (`vision_tower.vision_model.…`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
            for (name, linear) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.out_proj", &mut a.out_proj),
                ("mlp.fc1", &mut m.fc1),
                ("mlp.fc2", &mut m.fc2),
            ] {
                debug_assert!(LAYER_LINEARS.contains(&name));
                out.push((format!("{VISION_MODEL}.encoder.layers.{i}.{name}"), linear));
            }
        }
        out
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// pixel values [n, 3, H, W] -> hidden states after the last built layer, [n, 1 + patches, d] (CLS first).
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let n = pixel_values.size()[0];
        let patches = pixel_values
            .to_kind(self.patch_embedding.kind())
            .conv2d(&self.patch_embedding, None::<Tensor>, [self.patch_size, self.patch_size], [0, 0], [1, 1], 1)
            .flatten(2, 3)
            .transpose(1, 2);
        let d = self.class_embedding.size()[0];
        let cls = self.class_embedding.view([1, 1, d]).expand([n, 1, d], false);
        let x = Tensor::cat(&[cls, patches], 1) + self.position_embedding.unsqueeze(0);
        let mut x = self.pre_layrnorm.forward(&x);
        for layer in &self.layers {
            x = layer.forward(&x);
        }
        x
    }
}

/// transformers' `CLIPVisionModel` in full: every encoder layer and `post_layernorm`, for the pooled image feature
/// (LLaVA itself reads an inner layer and builds neither).
pub struct ClipVisionModel {
    tower: ClipVisionTower,
    post_layernorm: LayerNorm,
}

impl ClipVisionModel {
    /// `vb` points at `vision_tower.vision_model`.
    pub fn new(vb: &Vb, cfg: &VisionConfig) -> Self {
        ClipVisionModel {
            tower: ClipVisionTower::new(vb, cfg, cfg.num_hidden_layers),
            post_layernorm: LayerNorm::new(&vb.pp("post_layernorm"), cfg.hidden_size, cfg.layer_norm_eps),
        }
    }

    /// The vision tower of a model folder of any layout stic loads (the tower's own folder for an original
    /// checkpoint without it), and the image settings of the model.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<(Self, ImageConfig)> {
        let mut cfg = LlavaConfig::from_dir(dir, None)?;
        let mut ckpt = Checkpoint::open_dir(dir)?;
        complete_vision_config(&mut cfg, &mut ckpt, &dir.join("config.json"))?;
        let source = WeightSource::new(&ckpt, kind, device);
        let model = tch::no_grad(|| ClipVisionModel::new(&source.root().pp(VISION_MODEL), &cfg.vision));
        source.finish(|name| !name.starts_with(VISION_MODEL) || name.ends_with("embeddings.position_ids"))?;
        Ok((model, cfg.image))
    }

    /// pixel values [n, 3, H, W] -> `pooler_output` [n, d]: the CLS state after the last layer and
    /// `post_layernorm`.
    pub fn pooler_output(&self, pixel_values: &Tensor) -> Tensor {
        self.post_layernorm.forward(&self.tower.forward(pixel_values).select(1, 0))
    }
}
