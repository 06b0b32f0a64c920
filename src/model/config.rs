//! Typed model configuration, read from `config.json` of either the llava-hf or the original LLaVA layout.
use serde::Deserialize;
use std::path::{Path, PathBuf};

use crate::error::{read_json, Error, Result};
use crate::image::{AspectMode, ImageConfig, ImageConfigError, PatchMerge, Processing};
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
#[derive(Deserialize, Default, PartialEq)]
struct PreprocessorConfig {
    image_grid_pinpoints: Option<Vec<[u32; 2]>>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    crop_size: Option<serde_json::Value>,
    size: Option<serde_json::Value>,
    image_aspect_ratio: Option<String>,
    #[serde(flatten)]
    steps: ProcessorSteps,
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
                check_llava_next_sections(&raw).map_err(|why| Error::Config(format!("{}: {why}", path.display())))?;
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
        let (text_section, text_where) = match cfg.layout {
            Layout::LlavaHf => (&raw["text_config"], "text_config."),
            Layout::OriginalLlava => (&raw, ""),
        };
        let text_section = text_section.as_object().expect("checked to be an object");
        let refuse = |why: String| Error::Config(format!("{}: {why}", path.display()));
        refuse_unsupported(text_section, text_where, TEXT_SETTINGS).map_err(refuse)?;
        if let Some(theta) = rope_theta(text_section, text_where).map_err(refuse)? {
            cfg.text.rope_theta = theta;
        }
        cfg.validate(text_where).map_err(refuse)?;
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
        let config_path = dir.join("config.json");
        let Some((path, pre)) = read_image_processor(dir)? else {
            self.image.crop_size = self.vision.image_size as u32;
            self.image.shortest_edge = self.vision.image_size as u32;
            return self.check_image_settings(&config_path, &config_path);
        };
        pre.check(&path)?;
        let pinpoints_path = if pre.image_grid_pinpoints.is_some() { path.clone() } else { config_path.clone() };
        let model_pinpoints = self.image.grid_pinpoints.clone();
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
        self.check_image_settings(&pinpoints_path, &path)?;
        if self.image.grid_pinpoints != model_pinpoints {
            return Err(Error::Config(format!(
                "the image_grid_pinpoints of {} differ from those of {} (transformers tiles images with the first and \
                 unpads their features with the second): make them equal",
                path.display(),
                config_path.display()
            )));
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

/// The switches of transformers' image processors that turn a step of the pipeline off or change it. stic runs the
/// steps as `LlavaNextImageProcessor` does by default, so each is accepted only absent or at that default.
#[derive(Deserialize, Default, PartialEq)]
struct ProcessorSteps {
    do_resize: Option<bool>,
    do_center_crop: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    do_convert_rgb: Option<bool>,
    resample: Option<serde_json::Value>,
    rescale_factor: Option<f64>,
}

/// PIL's `Image.BICUBIC`.
const BICUBIC: u64 = 3;

impl PreprocessorConfig {
    /// Refuses processor settings that stic does not compute (so that they are never silently ignored).
    fn check(&self, path: &Path) -> Result<()> {
        let refuse = |why: String| Err(Error::Config(format!("{}: {why}", path.display())));
        let steps = &self.steps;
        for (name, value) in [
            ("do_resize", steps.do_resize),
            ("do_center_crop", steps.do_center_crop),
            ("do_rescale", steps.do_rescale),
            ("do_normalize", steps.do_normalize),
            ("do_convert_rgb", steps.do_convert_rgb),
        ] {
            if value == Some(false) {
                return refuse(format!("{name} is false: stic always runs that step, as the LLaVA-NeXT processor does by default"));
            }
        }
        if let Some(resample) = steps.resample.as_ref().filter(|r| r.as_u64() != Some(BICUBIC)) {
            return refuse(format!("resample is {resample}: stic resizes with bicubic resampling only (resample 3)"));
        }
        if let Some(factor) = steps.rescale_factor.filter(|f| (f - 1.0 / 255.0).abs() > 1e-12) {
            return refuse(format!("rescale_factor is {factor}: stic scales pixels by 1/255 only"));
        }
        for (name, value) in [("crop_size", &self.crop_size), ("size", &self.size)] {
            if let Some(value) = value {
                check_square_edge(value).or_else(|why| refuse(format!("{name} {value}: {why}")))?;
            }
        }
        Ok(())
    }
}

/// A tile edge as processors write it (`336`, `{"height": 336, "width": 336}` or `{"shortest_edge": 336}`): whole
/// numbers that fit in 32 bits, height equal to width (stic's tiles are square).
fn check_square_edge(value: &serde_json::Value) -> std::result::Result<(), String> {
    let whole = |v: &serde_json::Value| v.as_u64().is_some_and(|n| n <= u64::from(u32::MAX));
    let entries: Vec<&serde_json::Value> = match value.as_object() {
        Some(map) => ["height", "width", "shortest_edge"].iter().filter_map(|k| map.get(*k)).collect(),
        None => vec![value],
    };
    if entries.is_empty() || !entries.iter().all(|v| whole(v)) {
        return Err("the sizes must be whole numbers of pixels (height/width or shortest_edge)".into());
    }
    match (value.get("height"), value.get("width")) {
        (Some(h), Some(w)) if h != w => Err("height and width differ; stic supports square tiles only".into()),
        _ => Ok(()),
    }
}

/// The image processor settings: `preprocessor_config.json` (what transformers 4 reads) or the `image_processor`
/// entry of `processor_config.json` (what transformers 5 writes, and reads first). When both are there they must
/// agree, since the two transformers versions would otherwise preprocess differently.
fn read_image_processor(dir: &Path) -> Result<Option<(PathBuf, PreprocessorConfig)>> {
    let legacy_path = dir.join("preprocessor_config.json");
    let legacy: Option<PreprocessorConfig> = if legacy_path.is_file() { Some(read_json(&legacy_path)?) } else { None };
    let nested_path = dir.join("processor_config.json");
    let nested = if nested_path.is_file() {
        let processor: serde_json::Value = read_json(&nested_path)?;
        match processor.get("image_processor") {
            Some(settings) => Some(
                PreprocessorConfig::deserialize(settings)
                    .map_err(|e| Error::Config(format!("{}: image_processor: {e}", nested_path.display())))?,
            ),
            None => None,
        }
    } else {
        None
    };
    match (legacy, nested) {
        (Some(legacy), Some(nested)) if legacy != nested => Err(Error::Config(format!(
            "{} and the image_processor entry of {} give different image settings (transformers 4 reads the first, \
             transformers 5 the second): remove one of them or make them equal",
            legacy_path.display(),
            nested_path.display()
        ))),
        (Some(legacy), _) => Ok(Some((legacy_path, legacy))),
        (None, Some(nested)) => Ok(Some((nested_path, nested))),
        (None, None) => Ok(None),
    }
}

/// Values of a setting that leave the computation as stic does it.
#[derive(Clone, Copy)]
enum Inert {
    Null,
    False,
    True,
    Number(f64),
    Empty,
}

impl Inert {
    fn holds(self, value: &serde_json::Value) -> bool {
        value.is_null()
            || match self {
                Inert::Null => false,
                Inert::False => value.as_bool() == Some(false),
                Inert::True => value.as_bool() == Some(true),
                Inert::Number(n) => value.as_f64() == Some(n),
                Inert::Empty => value.as_object().is_some_and(|m| m.is_empty()) || value.as_array().is_some_and(|a| a.is_empty()),
            }
    }

    fn describe(self) -> String {
        match self {
            Inert::Null => "null (absent)".into(),
            Inert::False => "false".into(),
            Inert::True => "true".into(),
            Inert::Number(n) => n.to_string(),
            Inert::Empty => "empty".into(),
        }
    }
}

type Section = serde_json::Map<String, serde_json::Value>;

/// Settings transformers honours that change the computation and that stic does not implement.
const TEXT_SETTINGS: &[(&str, Inert)] = &[
    ("attention_bias", Inert::False),
    ("mlp_bias", Inert::False),
    ("attention_dropout", Inert::Number(0.0)),
    ("pretraining_tp", Inert::Number(1.0)),
    ("partial_rotary_factor", Inert::Number(1.0)),
    ("layer_types", Inert::Null),
    ("pruned_heads", Inert::Empty),
    ("quantization_config", Inert::Null),
];
const VISION_SETTINGS: &[(&str, Inert)] = &[
    ("num_channels", Inert::Number(3.0)),
    ("attention_dropout", Inert::Number(0.0)),
    ("pruned_heads", Inert::Empty),
    ("quantization_config", Inert::Null),
];
const LLAVA_NEXT_SETTINGS: &[(&str, Inert)] = &[("quantization_config", Inert::Null), ("multimodal_projector_bias", Inert::True)];

fn refuse_unsupported(section: &Section, place: &str, settings: &[(&str, Inert)]) -> std::result::Result<(), String> {
    for &(key, inert) in settings {
        if let Some(value) = section.get(key).filter(|v| !inert.holds(v)) {
            let hint = if key == "quantization_config" { " (save the checkpoint dequantized, e.g. in bf16)" } else { "" };
            return Err(format!("{place}{key} is {value}, which changes what the model computes; stic implements only {}{hint}", inert.describe()));
        }
    }
    Ok(())
}

/// `text_config` and `vision_config` of a llava-hf config, checked before serde fills in defaults: a section that is
/// not an object, or of another architecture, would otherwise become the 7B defaults.
fn check_llava_next_sections(raw: &serde_json::Value) -> std::result::Result<(), String> {
    let section = |key: &str, what: &str| match raw.get(key) {
        Some(serde_json::Value::Object(map)) => Ok(map),
        Some(other) => Err(format!("{key} is {other}; it must be an object with the {what} settings")),
        None => Err(format!("there is no {key} (the {what} settings)")),
    };
    let text = section("text_config", "Mistral decoder")?;
    match text.get("model_type").and_then(|v| v.as_str()) {
        Some("mistral") => {}
        Some(other) => return Err(format!("text_config.model_type is '{other}': stic runs Mistral decoders only")),
        None => {
            return Err("text_config has no model_type: transformers reads such a section as a llama config; add \
                        \"model_type\": \"mistral\" if the decoder is Mistral"
                .into())
        }
    }
    let vision = section("vision_config", "CLIP vision tower")?;
    if let Some(kind) = vision.get("model_type").and_then(|v| v.as_str()).filter(|k| *k != "clip_vision_model") {
        return Err(format!("vision_config.model_type is '{kind}': stic runs CLIP vision towers only (clip_vision_model)"));
    }
    refuse_unsupported(vision, "vision_config.", VISION_SETTINGS)?;
    refuse_unsupported(raw.as_object().expect("an object with sections"), "", LLAVA_NEXT_SETTINGS)
}

/// The RoPE base of a text section, when the section sets one. transformers 4 reads `rope_theta` and applies
/// `rope_scaling`; transformers 5 writes `rope_parameters: {rope_type, rope_theta}` instead (and prefers it). Only
/// the unscaled rotation (`rope_type` default) is implemented.
fn rope_theta(section: &Section, place: &str) -> std::result::Result<Option<f64>, String> {
    let number = |key: &str, value: &serde_json::Value| {
        value.as_f64().ok_or_else(|| format!("{place}{key} is {value}; it must be a number"))
    };
    let flat = section.get("rope_theta").filter(|v| !v.is_null()).map(|v| number("rope_theta", v)).transpose()?;
    let mut nested = None;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(value) = section.get(key).filter(|v| !v.is_null()) else { continue };
        let Some(params) = value.as_object() else {
            return Err(format!("{place}{key} is {value}; it must be an object such as {{\"rope_type\": \"default\", \"rope_theta\": 1000000.0}}"));
        };
        let kind = params.get("rope_type").or_else(|| params.get("type")).unwrap_or(&serde_json::Value::Null);
        if !(kind.is_null() || kind == "default") {
            return Err(format!(
                "{place}{key} has rope_type {kind}: stic implements only the default (unscaled) RoPE, so this \
                 checkpoint cannot run here"
            ));
        }
        for (name, value) in params {
            match name.as_str() {
                "rope_type" | "type" => {}
                "rope_theta" => nested = Some(number(&format!("{key}.rope_theta"), value)?),
                "partial_rotary_factor" if Inert::Number(1.0).holds(value) => {}
                other => return Err(format!("{place}{key}.{other} is {value}: stic knows only rope_type and rope_theta there")),
            }
        }
    }
    match (flat, nested) {
        (Some(flat), Some(nested)) if flat != nested => Err(format!(
            "{place}rope_theta is {flat} but {place}rope_parameters.rope_theta is {nested} (transformers 4 reads the \
             first, transformers 5 the second): make them equal"
        )),
        (flat, nested) => Ok(nested.or(flat)),
    }
}

/// Sizes that count something (heads, channels, pixels) must not be 0.
fn none_zero(place: &str, sizes: &[(&str, usize)]) -> std::result::Result<(), String> {
    match sizes.iter().find(|(_, size)| *size == 0) {
        Some((name, _)) => Err(format!("{place}{name} is 0; it must be at least 1")),
        None => Ok(()),
    }
}

impl TextConfig {
    fn validate(&self, place: &str) -> std::result::Result<(), String> {
        none_zero(place, &[
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("sliding_window", self.sliding_window.unwrap_or(1)),
        ])?;
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "{place}num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        let head_dim = self.head_dim();
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!("{place}head_dim is {head_dim} (hidden_size / num_attention_heads when absent); RoPE needs an even number ≥ 2"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("{place}rope_theta is {}; it must be a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!("{place}rms_norm_eps is {}; it must be a number ≥ 0", self.rms_norm_eps));
        }
        Ok(())
    }
}

impl VisionConfig {
    fn validate(&self) -> std::result::Result<(), String> {
        none_zero("vision_config.", &[
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("patch_size", self.patch_size),
        ])?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "vision_config.hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.image_size < self.patch_size {
            return Err(format!("vision_config.image_size {} is smaller than its patch_size {}", self.image_size, self.patch_size));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(format!("vision_config.layer_norm_eps is {}; it must be a number ≥ 0", self.layer_norm_eps));
        }
        Ok(())
    }
}

impl LlavaConfig {
    /// Checks the values of config.json that size tensors or divide, so that no command panics on them later.
    fn validate(&self, text_place: &str) -> std::result::Result<(), String> {
        self.text.validate(text_place)?;
        if self.vision_config_known {
            self.vision.validate()?;
        }
        if self.projector_hidden_act != "gelu" {
            return Err(format!("projector_hidden_act '{}' is not supported (gelu)", self.projector_hidden_act));
        }
        let vocab = self.text.vocab_size as i64;
        if self.layout == Layout::LlavaHf && !(0..vocab).contains(&self.image_token_id) {
            return Err(format!(
                "image_token_index {} is not a token of the vocabulary (text_config.vocab_size {vocab}): it must be \
                 the id of <image> in tokenizer.json (32000 in llava-hf's LLaVA-NeXT checkpoints)",
                self.image_token_id
            ));
        }
        Ok(())
    }

    /// Refuses image settings that cannot work, naming the file each came from.
    fn check_image_settings(&self, pinpoints_file: &Path, processor_file: &Path) -> Result<()> {
        if self.vision_config_known && self.image.crop_size as usize != self.vision.image_size {
            return Err(Error::Config(format!(
                "{}: crop_size {} differs from vision_config.image_size {}: the tiles must have the vision tower's input size",
                processor_file.display(),
                self.image.crop_size,
                self.vision.image_size
            )));
        }
        self.image.validate().map_err(|e| {
            let file = if matches!(e, ImageConfigError::Pinpoints(_)) { pinpoints_file } else { processor_file };
            Error::Config(format!("{}: {e}", file.display()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::rope_theta;
    use serde_json::json;

    fn theta(section: serde_json::Value) -> Result<Option<f64>, String> {
        rope_theta(section.as_object().expect("an object"), "text_config.")
    }

    #[test]
    fn rope_theta_of_both_transformers_versions() {
        assert_eq!(theta(json!({})), Ok(None));
        assert_eq!(theta(json!({"rope_theta": 1e6, "rope_scaling": null})), Ok(Some(1e6)));
        assert_eq!(theta(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})), Ok(Some(1e6)));
        assert_eq!(theta(json!({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 1e6}})), Ok(Some(1e6)));
        assert_eq!(theta(json!({"rope_theta": 5e5, "rope_parameters": {"rope_type": "default"}})), Ok(Some(5e5)));
        assert!(theta(json!({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 1e4}})).unwrap_err().contains("make them equal"));
        assert!(theta(json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}})).unwrap_err().contains("llama3"));
        assert!(theta(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap_err().contains("linear"));
        assert!(theta(json!({"rope_parameters": "default"})).unwrap_err().contains("must be an object"));
    }
}
