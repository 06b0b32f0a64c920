//! `stic init-tiny`: a small random LLaVA-NeXT-Mistral checkpoint in llava-hf layout, for demos and tests.
use std::path::Path;
use tch::{Device, Kind};

use super::clip::ClipVisionTower;
use super::linear::LayerNorm;
use super::mistral::MistralModel;
use super::projector::Projector;
use super::weights::{save_safetensors, WeightSource};
use super::LlavaConfig;
use crate::error::Result;
use crate::fsutil::{create_dir, write_atomic};

pub const TOKENIZER_FILES: [(&str, &[u8]); 3] = [
    ("tokenizer.json", include_bytes!("../../third_party/mistral-7b-tokenizer/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../third_party/mistral-7b-tokenizer/tokenizer_config.json")),
    ("special_tokens_map.json", include_bytes!("../../third_party/mistral-7b-tokenizer/special_tokens_map.json")),
];

const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const PINPOINTS: [[u32; 2]; 5] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]];

fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "image_token_index": 32000,
        "image_grid_pinpoints": PINPOINTS,
        "image_seq_length": 576,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "mistral",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": null,
            "vocab_size": 32002,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": false
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 64,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5
        }
    })
}

/// The `preprocessor_config.json` and `processor_config.json` of llava-hf's LLaVA-v1.6 processor.
pub fn processor_configs() -> [(&'static str, serde_json::Value); 2] {
    [
        (
            "preprocessor_config.json",
            serde_json::json!({
                "image_processor_type": "LlavaNextImageProcessor",
                "processor_class": "LlavaNextProcessor",
                "crop_size": {"height": 336, "width": 336},
                "size": {"shortest_edge": 336},
                "do_center_crop": true,
                "do_convert_rgb": true,
                "do_normalize": true,
                "do_pad": true,
                "do_rescale": true,
                "do_resize": true,
                "image_grid_pinpoints": PINPOINTS,
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
                "resample": 3,
                "rescale_factor": 1.0 / 255.0
            }),
        ),
        (
            "processor_config.json",
            serde_json::json!({
                "processor_class": "LlavaNextProcessor",
                "image_token": "<image>",
                "num_additional_image_tokens": 1,
                "patch_size": 14,
                "vision_feature_select_strategy": "default"
            }),
        ),
    ]
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    write_atomic(path, text.as_bytes())
}

/// Writes config, processor configs, tokenizer and random weights (seeded) to `dir`.
pub fn write_tiny_model(dir: &Path, seed: i64) -> Result<()> {
    create_dir(dir)?;
    write_json(&dir.join("config.json"), &tiny_config())?;
    for (name, value) in processor_configs() {
        write_json(&dir.join(name), &value)?;
    }
    for (name, bytes) in TOKENIZER_FILES {
        write_atomic(&dir.join(name), bytes)?;
    }
    let cfg = LlavaConfig::from_dir(dir)?;
    tch::manual_seed(seed);
    let source = WeightSource::random(Kind::Float, Device::Cpu);
    let vb = source.root();
    let vision = vb.pp("vision_tower.vision_model");
    ClipVisionTower::new(&vision, &cfg.vision, cfg.vision.num_hidden_layers);
    LayerNorm::new(&vision.pp("post_layernorm"), cfg.vision.hidden_size, cfg.vision.layer_norm_eps);
    Projector::new(&vb.pp("multi_modal_projector"), cfg.vision.hidden_size, cfg.text.hidden_size);
    let _ = vb.get(&[cfg.text.hidden_size as i64], "image_newline");
    MistralModel::new(&vb.pp("language_model"), &cfg.text);
    save_safetensors(&dir.join("model.safetensors"), &source.into_generated())
}
