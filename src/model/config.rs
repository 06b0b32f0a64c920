//! Typed model configuration, read from `config.json` of either the llava-hf or the original LLaVA layout.
use serde::Deserialize;
use std::path::Path;

use crate::error::{read_json, Error, Result};
use crate::image::{AspectMode, ImageConfig, PatchMerge, Processing};
use crate::text::tokenizer::IMAGE_TOKEN_INDEX;

/// Mistral decoder settings; defaults are those of transformers' `MistralConfig`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct TextConfig {
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::num_key_value_heads")]
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "defaults::sliding_window")]
    pub sliding_window: Option<usize>,
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// CLIP vision tower settings; defaults are those of transformers' `CLIPVisionConfig`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct VisionConfig {
    #[serde(default = "defaults::clip_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::clip_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::clip_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::clip_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::clip_image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::clip_patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::quick_gelu")]
    pub hidden_act: String,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// Which tensor naming the checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// llava-hf `LlavaNextForConditionalGeneration` (older `language_model.model.*` or newer `model.language_model.*` keys).
    LlavaHf,
    /// The original LLaVA `LlavaMistralForCausalLM` (`model.layers.*`, `model.mm_projector.0/2`).
    OriginalLlava,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the CLS token (`default` / LLaVA's `patch`).
    Patch,
    /// Keep it (`full` / LLaVA's `cls_patch`).
    Full,
}

/// Everything needed to build and run a LLaVA-NeXT-Mistral model.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub layout: Layout,
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image: ImageConfig,
    pub image_token_id: i64,
    pub vision_feature_layer: i64,
    pub feature_select: FeatureSelect,
    pub projector_hidden_act: String,
    /// Original-layout configs carry no vision config: it is inferred from the weights when this is false.
    pub vision_config_known: bool,
    /// LLaVA's `tokenizer_model_max_length`: its code cuts longer inputs (image features included) there.
    pub llava_max_length: Option<usize>,
}

mod defaults {
    pub fn hidden_size() -> usize { 4096 }
    pub fn intermediate_size() -> usize { 14336 }
    pub fn num_hidden_layers() -> usize { 32 }
    pub fn num_attention_heads() -> usize { 32 }
    pub fn num_key_value_heads() -> usize { 8 }
    pub fn rms_norm_eps() -> f64 { 1e-6 }
    pub fn rope_theta() -> f64 { 10000.0 }
    pub fn sliding_window() -> Option<usize> { Some(4096) }
    pub fn vocab_size() -> usize { 32000 }
    pub fn max_position_embeddings() -> usize { 4096 * 32 }
    pub fn silu() -> String { "silu".into() }
    pub fn clip_hidden_size() -> usize { 768 }
    pub fn clip_intermediate_size() -> usize { 3072 }
    pub fn clip_layers() -> usize { 12 }
    pub fn clip_heads() -> usize { 12 }
    pub fn clip_image_size() -> usize { 224 }
    pub fn clip_patch_size() -> usize { 32 }
    pub fn layer_norm_eps() -> f64 { 1e-5 }
    pub fn quick_gelu() -> String { "quick_gelu".into() }
    pub fn image_token_index() -> i64 { 32000 }
    pub fn vision_feature_layer() -> i64 { -2 }
    pub fn strategy() -> String { "default".into() }
    pub fn gelu() -> String { "gelu".into() }
    pub fn pinpoints() -> Vec<[u32; 2]> { vec![[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] }
    pub fn clip_vit_l_336() -> super::VisionConfig {
        super::VisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size: 336,
            patch_size: 14,
            layer_norm_eps: 1e-5,
            hidden_act: quick_gelu(),
        }
    }
}

#[derive(Deserialize)]
struct HfConfig {
    text_config: TextConfig,
    vision_config: VisionConfig,
    #[serde(default = "defaults::image_token_index", alias = "image_token_id")]
    image_token_index: i64,
    #[serde(default = "defaults::vision_feature_layer")]
    vision_feature_layer: i64,
    #[serde(default = "defaults::strategy")]
    vision_feature_select_strategy: String,
    #[serde(default = "defaults::gelu")]
    projector_hidden_act: String,
    #[serde(default = "defaults::pinpoints")]
    image_grid_pinpoints: Vec<[u32; 2]>,
    #[serde(default)]
    tie_word_embeddings: bool,
}

#[derive(Deserialize)]
struct OriginalConfig {
    #[serde(flatten)]
    text: TextConfig,
    #[serde(default)]
    mm_vision_tower: Option<String>,
    #[serde(default)]
    mm_hidden_size: Option<usize>,
    #[serde(default)]
    mm_use_im_start_end: bool,
    #[serde(default)]
    mm_use_im_patch_token: bool,
    #[serde(default)]
    tokenizer_model_max_length: Option<usize>,
    #[serde(default = "defaults::vision_feature_layer")]
    mm_vision_select_layer: i64,
    #[serde(default)]
    mm_vision_select_feature: Option<String>,
    #[serde(default)]
    mm_projector_type: Option<String>,
    #[serde(default)]
    image_aspect_ratio: Option<String>,
    #[serde(default = "defaults::pinpoints")]
    image_grid_pinpoints: Vec<[u32; 2]>,
    #[serde(default)]
    mm_patch_merge_type: Option<String>,
}

/// The subset of `preprocessor_config.json` that changes preprocessing.
#[derive(Deserialize, Default)]
struct PreprocessorConfig {
    image_grid_pinpoints: Option<Vec<[u32; 2]>>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    crop_size: Option<serde_json::Value>,
    size: Option<serde_json::Value>,
    image_aspect_ratio: Option<String>,
}

fn edge_from(value: &serde_json::Value, keys: &[&str]) -> Option<u32> {
    if let Some(n) = value.as_u64() {
        return Some(n as u32);
    }
    keys.iter().find_map(|k| value.get(k).and_then(|v| v.as_u64())).map(|n| n as u32)
}

fn feature_select(name: &str, path: &Path) -> Result<FeatureSelect> {
    match name {
        "default" | "patch" => Ok(FeatureSelect::Patch),
        "full" | "cls_patch" => Ok(FeatureSelect::Full),
        other => Err(Error::Config(format!(
            "{}: unknown vision feature strategy '{other}' (expected default/patch or full/cls_patch)",
            path.display()
        ))),
    }
}

impl LlavaConfig {
    /// Reads `config.json` (and `preprocessor_config.json` when present) from a model folder. The processing
    /// follows the layout (LLaVA's code for an original checkpoint, transformers' for llava-hf) unless
    /// `processing` says otherwise.
    pub fn from_dir(dir: &Path, processing: Option<Processing>) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::Config(format!(
                "{} not found: --model must be a folder with config.json, the tokenizer and *.safetensors",
                path.display()
            )));
        }
        let raw: serde_json::Value = read_json(&path)?;
        let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let parse_err = |e: serde_json::Error| Error::Config(format!("{}: {e}", path.display()));
        let mut cfg = match model_type {
            "llava_next" => {
                let hf: HfConfig = serde_json::from_value(raw.clone()).map_err(parse_err)?;
                let mut text = hf.text_config;
                text.tie_word_embeddings |= hf.tie_word_embeddings;
                LlavaConfig {
                    layout: Layout::LlavaHf,
                    text,
                    vision: hf.vision_config,
                    image: ImageConfig { grid_pinpoints: pairs(&hf.image_grid_pinpoints), ..ImageConfig::default() },
                    image_token_id: hf.image_token_index,
                    vision_feature_layer: hf.vision_feature_layer,
                    feature_select: feature_select(&hf.vision_feature_select_strategy, &path)?,
                    projector_hidden_act: hf.projector_hidden_act,
                    vision_config_known: true,
                    llava_max_length: None,
                }
            }
            "llava_mistral" | "llava" => {
                let orig: OriginalConfig = serde_json::from_value(raw.clone()).map_err(parse_err)?;
                original_config(orig, &path)?
            }
            other => {
                return Err(Error::Config(format!(
                    "{}: unknown model_type '{other}'; supported: llava_next (llava-hf LLaVA-NeXT) and \
                     llava_mistral (original LLaVA-v1.6-Mistral)",
                    path.display()
                )))
            }
        };
        if cfg.text.hidden_act != "silu" {
            return Err(Error::Config(format!("{}: text hidden_act '{}' is not supported (silu)", path.display(), cfg.text.hidden_act)));
        }
        if !matches!(cfg.vision.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::Config(format!("{}: vision hidden_act '{}' is not supported", path.display(), cfg.vision.hidden_act)));
        }
        cfg.apply_preprocessor_config(dir)?;
        if let Some(processing) = processing {
            cfg.image.processing = processing;
        }
        Ok(cfg)
    }

    fn apply_preprocessor_config(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            self.image.crop_size = self.vision.image_size as u32;
            self.image.shortest_edge = self.vision.image_size as u32;
            return Ok(());
        }
        let pre: PreprocessorConfig = read_json(&path)?;
        if let Some(p) = pre.image_grid_pinpoints {
            self.image.grid_pinpoints = pairs(&p);
        }
        if let Some(m) = pre.image_mean {
            self.image.image_mean = m;
        }
        if let Some(s) = pre.image_std {
            self.image.image_std = s;
        }
        self.image.crop_size = pre.crop_size.as_ref().and_then(|v| edge_from(v, &["height", "shortest_edge"])).unwrap_or(self.vision.image_size as u32);
        self.image.shortest_edge = pre.size.as_ref().and_then(|v| edge_from(v, &["shortest_edge", "height"])).unwrap_or(self.image.crop_size);
        if pre.image_aspect_ratio.as_deref() == Some("pad") {
            self.image.aspect_mode = AspectMode::Pad;
        }
        Ok(())
    }

    /// `ids` as the reference of this processing writes them: LLaVA's code keeps [`IMAGE_TOKEN_INDEX`] at image
    /// positions, transformers' processor writes `image_token_index` there.
    pub fn reference_ids(&self, ids: &[i64]) -> Vec<i64> {
        match self.image.processing {
            Processing::Llava => ids.to_vec(),
            Processing::Transformers => ids.iter().map(|&i| if i == IMAGE_TOKEN_INDEX { self.image_token_id } else { i }).collect(),
        }
    }

    /// Index into CLIP's hidden states (0 = embeddings) of the layer whose output feeds the projector.
    pub fn vision_layer_index(&self) -> Result<usize> {
        let n = self.vision.num_hidden_layers as i64;
        let idx = if self.vision_feature_layer < 0 { n + 1 + self.vision_feature_layer } else { self.vision_feature_layer };
        if !(0..=n).contains(&idx) {
            return Err(Error::Config(format!("vision_feature_layer {} is outside the {n} CLIP layers", self.vision_feature_layer)));
        }
        Ok(idx as usize)
    }
}

/// The config of an original LLaVA checkpoint (`LlavaMistralForCausalLM`), with every setting that changes the
/// maths mapped or refused: LLaVA's code reads these with defaults of its own (`mm_patch_merge_type` flat,
/// `mm_projector_type` linear), which apply here too.
fn original_config(orig: OriginalConfig, path: &Path) -> Result<LlavaConfig> {
    let unsupported = |what: String| Err(Error::Config(format!("{}: {what}", path.display())));
    let Some(tower) = orig.mm_vision_tower.as_deref() else {
        return unsupported("no mm_vision_tower: not a LLaVA multimodal checkpoint (a plain language model?)".into());
    };
    if !tower.to_ascii_lowercase().contains("clip") && !Path::new(tower).exists() {
        return unsupported(format!("mm_vision_tower '{tower}' is not a CLIP tower (stic runs CLIP ViT towers, as LLaVA-v1.6 has)"));
    }
    match orig.mm_projector_type.as_deref() {
        Some("mlp2x_gelu") => {}
        Some(kind) => return unsupported(format!("mm_projector_type '{kind}' is not supported (only mlp2x_gelu)")),
        None => return unsupported("no mm_projector_type (LLaVA then builds a linear projector, which stic does not support; LLaVA-v1.6 uses mlp2x_gelu)".into()),
    }
    let patch_merge = match orig.mm_patch_merge_type.as_deref() {
        Some("spatial_unpad") => PatchMerge::SpatialUnpad,
        Some("flat") | None => PatchMerge::Flat,
        Some(kind) => return unsupported(format!("mm_patch_merge_type '{kind}' is not supported (spatial_unpad or flat)")),
    };
    let aspect_mode = match orig.image_aspect_ratio.as_deref() {
        Some("anyres") => AspectMode::Anyres,
        Some("pad") => AspectMode::Pad,
        Some(kind) => return unsupported(format!("image_aspect_ratio '{kind}' is not supported (anyres or pad)")),
        None => return unsupported("no image_aspect_ratio (LLaVA then center-crops a square, which stic does not support: anyres or pad)".into()),
    };
    if orig.mm_use_im_start_end || orig.mm_use_im_patch_token {
        return unsupported("mm_use_im_start_end / mm_use_im_patch_token add image tokens to the vocabulary, which stic does not support".into());
    }
    let feature_select = feature_select(orig.mm_vision_select_feature.as_deref().unwrap_or("patch"), path)?;
    Ok(LlavaConfig {
        layout: Layout::OriginalLlava,
        text: orig.text,
        vision: VisionConfig { hidden_size: orig.mm_hidden_size.unwrap_or(1024), ..defaults::clip_vit_l_336() },
        image: ImageConfig {
            grid_pinpoints: pairs(&orig.image_grid_pinpoints),
            aspect_mode,
            processing: Processing::Llava,
            patch_merge,
            ..ImageConfig::default()
        },
        image_token_id: defaults::image_token_index(),
        vision_feature_layer: orig.mm_vision_select_layer,
        feature_select,
        projector_hidden_act: defaults::gelu(),
        vision_config_known: false,
        llava_max_length: orig.tokenizer_model_max_length,
    })
}

fn pairs(p: &[[u32; 2]]) -> Vec<(u32, u32)> {
    p.iter().map(|[h, w]| (*h, *w)).collect()
}

impl LlavaConfig {
    /// The llava-hf `config.json` of this model (what transformers' `LlavaNextForConditionalGeneration` reads).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let pinpoints: Vec<[u32; 2]> = self.image.grid_pinpoints.iter().map(|&(h, w)| [h, w]).collect();
        let mut text = serde_json::to_value(&self.text).expect("serialisable");
        text["model_type"] = "mistral".into();
        let mut vision = serde_json::to_value(&self.vision).expect("serialisable");
        vision["model_type"] = "clip_vision_model".into();
        vision["projection_dim"] = self.vision.hidden_size.into();
        serde_json::json!({
            "architectures": ["LlavaNextForConditionalGeneration"],
            "model_type": "llava_next",
            "image_token_index": self.image_token_id,
            "image_grid_pinpoints": pinpoints,
            "image_seq_length": (self.vision.image_size / self.vision.patch_size).pow(2),
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": match self.feature_select { FeatureSelect::Patch => "default", FeatureSelect::Full => "full" },
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "text_config": text,
            "vision_config": vision,
        })
    }

    /// `preprocessor_config.json` and `processor_config.json` as llava-hf ships them for this model.
    pub fn processor_json(&self) -> [(&'static str, serde_json::Value); 2] {
        let img = &self.image;
        let pinpoints: Vec<[u32; 2]> = img.grid_pinpoints.iter().map(|&(h, w)| [h, w]).collect();
        [
            (
                "preprocessor_config.json",
                serde_json::json!({
                    "image_processor_type": "LlavaNextImageProcessor",
                    "processor_class": "LlavaNextProcessor",
                    "crop_size": {"height": img.crop_size, "width": img.crop_size},
                    "size": {"shortest_edge": img.shortest_edge},
                    "do_center_crop": true,
                    "do_convert_rgb": true,
                    "do_normalize": true,
                    "do_pad": true,
                    "do_rescale": true,
                    "do_resize": true,
                    "image_grid_pinpoints": pinpoints,
                    "image_mean": img.image_mean,
                    "image_std": img.image_std,
                    "resample": 3,
                    "rescale_factor": 1.0 / 255.0,
                }),
            ),
            (
                "processor_config.json",
                serde_json::json!({
                    "processor_class": "LlavaNextProcessor",
                    "image_token": "<image>",
                    "num_additional_image_tokens": 1,
                    "patch_size": self.vision.patch_size,
                    "vision_feature_select_strategy": match self.feature_select { FeatureSelect::Patch => "default", FeatureSelect::Full => "full" },
                }),
            ),
        ]
    }
}
