//! The model geometries stic can build with random weights: `init-tiny`'s checkpoint and `--random-weights`,
//! which builds one in memory on the target device (throughput checks of the full-size model without its 15 GB
//! of weights).
use tch::{Device, Kind, Tensor};

use super::clip::ClipVisionTower;
use super::config::{DecoderFamily, FeatureSelect, Layout, TextConfig, VisionConfig};
use super::decoder::DecoderModel;
use super::linear::LayerNorm;
use super::projector::Projector;
use super::tiny::tiny_config;
use super::weights::WeightSource;
use super::LlavaConfig;
use crate::image::ImageConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Geometry {
    /// What `stic init-tiny` writes.
    Tiny,
    /// llava-hf/llava-v1.6-mistral-7b-hf.
    #[value(name = "llava-v1.6-mistral-7b")]
    LlavaV16Mistral7b,
}

impl Geometry {
    pub fn name(self) -> &'static str {
        match self {
            Geometry::Tiny => "tiny",
            Geometry::LlavaV16Mistral7b => "llava-v1.6-mistral-7b",
        }
    }

    pub fn config(self) -> LlavaConfig {
        match self {
            Geometry::Tiny => tiny_config(),
            Geometry::LlavaV16Mistral7b => llava_v16_mistral_7b_config(),
        }
    }
}

/// llava-hf/llava-v1.6-mistral-7b-hf's config.json: Mistral-7B-Instruct-v0.2 (its vocabulary padded to 32064 by
/// llava-hf), CLIP ViT-L/14-336, the mlp2x_gelu projector, anyres pinpoints and image_newline.
fn llava_v16_mistral_7b_config() -> LlavaConfig {
    let text = TextConfig {
        family: DecoderFamily::Mistral,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        sliding_window: None,
        vocab_size: 32064,
        max_position_embeddings: 32768,
        hidden_act: "silu".into(),
        tie_word_embeddings: false,
    };
    llava_next_mistral(text, VisionConfig::clip_vit_l_336())
}

/// A llava-hf LLaVA-NeXT-Mistral checkpoint's config of the given decoder and tower (what every geometry shares:
/// anyres, image token 32000, the penultimate layer's patch features, the gelu projector).
pub(super) fn llava_next_mistral(text: TextConfig, vision: VisionConfig) -> LlavaConfig {
    LlavaConfig {
        layout: Layout::LlavaHf,
        text,
        vision,
        image: ImageConfig::default(),
        image_token_id: 32000,
        vision_feature_layer: -2,
        feature_select: FeatureSelect::Patch,
        projector_hidden_act: "gelu".into(),
        vision_config_known: true,
        vision_tower: None,
        llava_max_length: None,
        eos_token_ids: Vec::new(),
    }
}

/// Every tensor of a llava-hf checkpoint of `cfg`, drawn from torch's generator (seed it first) in one fixed
/// order, so that a seed gives the same weights whether they are saved (`init-tiny`) or used in place.
pub fn random_tensors(cfg: &LlavaConfig, kind: Kind, device: Device) -> Vec<(String, Tensor)> {
    let source = WeightSource::random(kind, device);
    let vb = source.root();
    tch::no_grad(|| {
        let vision = vb.pp("vision_tower.vision_model");
        ClipVisionTower::new(&vision, &cfg.vision, cfg.vision.num_hidden_layers);
        LayerNorm::new(&vision.pp("post_layernorm"), cfg.vision.hidden_size, cfg.vision.layer_norm_eps);
        Projector::new(&vb.pp("multi_modal_projector"), cfg.vision.hidden_size, cfg.text.hidden_size);
        let _ = vb.get(&[cfg.text.hidden_size as i64], "image_newline");
        DecoderModel::new(&vb.pp("language_model"), &cfg.text);
    });
    source.into_generated()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoder's parameters from its shapes, without allocating them.
    fn decoder_parameters(text: &TextConfig) -> u64 {
        let (hidden, inter, vocab) = (text.hidden_size as u64, text.intermediate_size as u64, text.vocab_size as u64);
        let kv = (text.num_key_value_heads * text.head_dim()) as u64;
        let attention = hidden * hidden * 2 + hidden * kv * 2;
        let mlp = 3 * hidden * inter;
        let layer = attention + mlp + 2 * hidden;
        2 * vocab * hidden + text.num_hidden_layers as u64 * layer + hidden
    }

    #[test]
    fn the_7b_geometry_has_mistral_7b_parameter_count() {
        let cfg = Geometry::LlavaV16Mistral7b.config();
        // Mistral-7B-v0.1/v0.2: 7,241,732,096 parameters with its 32000-token vocabulary; llava-hf pads it to
        // 32064 (64 more rows in the embedding and in lm_head).
        assert_eq!(decoder_parameters(&cfg.text), 7_241_732_096 + 2 * 64 * 4096);
        assert_eq!(cfg.text.head_dim(), 128);
    }
}
