//! Typed model configuration, read from `config.json` of either the llava-hf or the original LLaVA layout.
use serde::Deserialize;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fsutil::read_json;
use crate::image::{AspectMode, ImageConfig, PatchMerge, Processing};
use crate::text::tokenizer::IMAGE_TOKEN_INDEX;

mod original;
mod preprocessor;
mod tower;
mod validate;

use original::{original_config, OriginalConfig};
pub use tower::{check_tower_agrees, VisionTower};
use validate::{check_llava_next_sections, refuse_unsupported, rope_theta, TEXT_SETTINGS};

/// The decoders stic runs, by their `text_config.model_type`. They share one implementation; the family decides
/// the defaults of absent settings and whether a sliding window applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderFamily {
    Mistral,
    /// Llama, and what transformers reads as Llama: Vicuna, Yi, a `text_config` without `model_type`.
    Llama,
}

impl DecoderFamily {
    pub fn model_type(self) -> &'static str {
        match self {
            DecoderFamily::Mistral => "mistral",
            DecoderFamily::Llama => "llama",
        }
    }
}

/// Decoder settings, with the defaults of the family's transformers config (`MistralConfig` or `LlamaConfig`).
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct TextConfig {
    #[serde(skip)]
    pub family: DecoderFamily,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub sliding_window: Option<usize>,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub tie_word_embeddings: bool,
}

/// A decoder section as written, before the family's defaults fill what it leaves out. The family-dependent settings
/// are `None` when absent; the outer `Option` of `num_key_value_heads` and `sliding_window` tells an absent key from
/// an explicit null, which transformers reads differently (Mistral: absent = 8 KV heads and a 4096 window; null = as
/// many KV heads as heads and no window).
#[derive(Deserialize)]
struct TextSettings {
    #[serde(default = "defaults::hidden_size")]
    hidden_size: usize,
    #[serde(default, deserialize_with = "present")]
    intermediate_size: Option<usize>,
    #[serde(default = "defaults::num_hidden_layers")]
    num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    num_attention_heads: usize,
    #[serde(default, deserialize_with = "present")]
    num_key_value_heads: Option<Option<usize>>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "defaults::rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    rope_theta: f64,
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<usize>>,
    #[serde(default = "defaults::vocab_size")]
    vocab_size: usize,
    #[serde(default, deserialize_with = "present")]
    max_position_embeddings: Option<usize>,
    #[serde(default = "defaults::silu")]
    hidden_act: String,
    #[serde(default)]
    tie_word_embeddings: bool,
}

/// A key that is there (null too, when `T` takes it).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl TextSettings {
    fn resolve(self, family: DecoderFamily) -> TextConfig {
        let llama = family == DecoderFamily::Llama;
        TextConfig {
            family,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size.unwrap_or(if llama { 11008 } else { 14336 }),
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: match self.num_key_value_heads {
                None if !llama => defaults::num_key_value_heads(),
                None | Some(None) => self.num_attention_heads,
                Some(Some(n)) => n,
            },
            head_dim: self.head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            // LlamaConfig has no sliding window (a llava-hf section that names one is refused before this)
            sliding_window: if llama { None } else { self.sliding_window.unwrap_or(defaults::sliding_window()) },
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(if llama { 2048 } else { 4096 * 32 }),
            hidden_act: self.hidden_act,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }
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

impl VisionConfig {
    /// CLIP ViT-L/14 at 336 pixels, LLaVA-1.5's and LLaVA-1.6's tower.
    pub fn clip_vit_l_336() -> Self {
        defaults::clip_vit_l_336()
    }
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

/// Everything needed to build and run a LLaVA-NeXT model (Mistral or Llama decoder).
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
    /// Original-layout configs carry no vision config: it is read from the tower's folder, or inferred from the
    /// weights when this is false.
    pub vision_config_known: bool,
    /// Where an original-layout checkpoint's CLIP tower is (`mm_vision_tower`); `None` for llava-hf.
    pub vision_tower: Option<VisionTower>,
    /// LLaVA's `tokenizer_model_max_length`: its code cuts longer inputs (image features included) there.
    pub llava_max_length: Option<usize>,
    /// The ids generation stops at, as `generate` reads them: `generation_config.json`'s `eos_token_id`, else the
    /// decoder section's; empty when neither names one (the tokenizer's EOS then).
    pub eos_token_ids: Vec<i64>,
}

mod defaults {
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn num_hidden_layers() -> usize {
        32
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn num_key_value_heads() -> usize {
        8
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn sliding_window() -> Option<usize> {
        Some(4096)
    }
    pub fn vocab_size() -> usize {
        32000
    }
    pub fn silu() -> String {
        "silu".into()
    }
    pub fn clip_hidden_size() -> usize {
        768
    }
    pub fn clip_intermediate_size() -> usize {
        3072
    }
    pub fn clip_layers() -> usize {
        12
    }
    pub fn clip_heads() -> usize {
        12
    }
    pub fn clip_image_size() -> usize {
        224
    }
    pub fn clip_patch_size() -> usize {
        32
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn quick_gelu() -> String {
        "quick_gelu".into()
    }
    pub fn image_token_index() -> i64 {
        32000
    }
    pub fn vision_feature_layer() -> i64 {
        -2
    }
    pub fn strategy() -> String {
        "default".into()
    }
    pub fn gelu() -> String {
        "gelu".into()
    }
    pub fn pinpoints() -> Vec<[u32; 2]> {
        vec![[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    }
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
    text_config: TextSettings,
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

/// A `model_type` "llava" config written by transformers (`LlavaForConditionalGeneration`, llava-hf's LLaVA-1.5)
/// rather than by LLaVA's own code (`LlavaLlamaForCausalLM`, which has the decoder settings at the top level).
fn is_llava_hf(raw: &serde_json::Value) -> bool {
    let architectures = raw.get("architectures").and_then(|a| a.as_array());
    raw.get("text_config").is_some()
        || architectures.is_some_and(|a| a.iter().any(|n| n == "LlavaForConditionalGeneration"))
}

/// The config of a llava-hf checkpoint: `LlavaNextForConditionalGeneration` (anyres tiles) or
/// `LlavaForConditionalGeneration` (LLaVA-1.5: one centre-cropped tile, no `image_newline`).
fn hf_config(raw: &serde_json::Value, path: &Path, aspect_mode: AspectMode) -> Result<LlavaConfig> {
    let family = check_llava_next_sections(raw).map_err(|why| Error::Config(format!("{}: {why}", path.display())))?;
    let hf: HfConfig =
        serde_json::from_value(raw.clone()).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let mut text = hf.text_config.resolve(family);
    text.tie_word_embeddings |= hf.tie_word_embeddings;
    let image = match aspect_mode {
        AspectMode::CenterCrop => ImageConfig {
            grid_pinpoints: Vec::new(),
            aspect_mode,
            patch_merge: PatchMerge::Flat,
            ..ImageConfig::default()
        },
        _ => ImageConfig { grid_pinpoints: pairs(&hf.image_grid_pinpoints), aspect_mode, ..ImageConfig::default() },
    };
    Ok(LlavaConfig {
        layout: Layout::LlavaHf,
        text,
        vision: hf.vision_config,
        image,
        image_token_id: hf.image_token_index,
        vision_feature_layer: hf.vision_feature_layer,
        feature_select: feature_select(&hf.vision_feature_select_strategy, path)?,
        projector_hidden_act: hf.projector_hidden_act,
        vision_config_known: true,
        vision_tower: None,
        llava_max_length: None,
        eos_token_ids: Vec::new(),
    })
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

/// `eos_token_id` as an id or a list of ids (transformers writes both), from `generation_config.json` when it names
/// one, else from the decoder's section of config.json.
fn eos_token_ids(
    dir: &Path,
    text_section: &serde_json::Map<String, serde_json::Value>,
    text_where: &str,
) -> Result<Vec<i64>> {
    let parse = |value: &serde_json::Value, place: String| -> Result<Vec<i64>> {
        let ids = match value {
            serde_json::Value::Array(items) => items.iter().map(|v| v.as_i64()).collect::<Option<Vec<_>>>(),
            other => other.as_i64().map(|id| vec![id]),
        };
        ids.ok_or_else(|| Error::Config(format!("{place}eos_token_id is {value}, not a token id or a list of ids")))
    };
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        let raw: serde_json::Value = read_json(&generation)?;
        if let Some(value) = raw.get("eos_token_id").filter(|v| !v.is_null()) {
            return parse(value, format!("{}: ", generation.display()));
        }
    }
    match text_section.get("eos_token_id").filter(|v| !v.is_null()) {
        Some(value) => parse(value, format!("{}: {text_where}", dir.join("config.json").display())),
        None => Ok(Vec::new()),
    }
}

/// The `model_type`s stic reads, for the messages that refuse another.
const SUPPORTED: &str = "llava_next (llava-hf LLaVA-NeXT), llava with a text_config (llava-hf LLaVA-1.5), \
                         llava_mistral (original LLaVA-v1.6-Mistral), llava_llama and llava (original LLaVA-v1.5 and \
                         LLaVA-v1.6-Vicuna)";

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
            "llava_next" => hf_config(&raw, &path, AspectMode::Anyres)?,
            "llava" if is_llava_hf(&raw) => {
                let cfg = hf_config(&raw, &path, AspectMode::CenterCrop)?;
                if cfg.feature_select == FeatureSelect::Full {
                    return Err(Error::Config(format!(
                        "{}: vision_feature_select_strategy 'full' is not supported for LLaVA-1.5 (llava-hf ships \
                         'default', which drops the CLS feature)",
                        path.display()
                    )));
                }
                cfg
            }
            "llava_mistral" | "llava_llama" | "llava" => {
                let orig: OriginalConfig = serde_json::from_value(raw.clone()).map_err(parse_err)?;
                original_config(orig, model_type, &path)?
            }
            other => {
                return Err(Error::Config(format!(
                    "{}: unknown model_type '{other}'; supported: {SUPPORTED}",
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
        cfg.eos_token_ids = eos_token_ids(dir, text_section, text_where)?;
        if cfg.text.hidden_act != "silu" {
            return Err(Error::Config(format!(
                "{}: text hidden_act '{}' is not supported (silu)",
                path.display(),
                cfg.text.hidden_act
            )));
        }
        if !matches!(cfg.vision.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::Config(format!(
                "{}: vision hidden_act '{}' is not supported",
                path.display(),
                cfg.vision.hidden_act
            )));
        }
        if let Some(VisionTower::Folder(tower)) = cfg.vision_tower.clone() {
            // LLaVA's CLIPVisionTower preprocesses with the tower's own CLIPImageProcessor
            cfg.apply_preprocessor_config(&tower)?;
        }
        cfg.apply_preprocessor_config(dir)?;
        if let Some(processing) = processing {
            cfg.image.processing = processing;
        }
        Ok(cfg)
    }

    /// `ids` as the reference of this processing writes them: LLaVA's code keeps [`IMAGE_TOKEN_INDEX`] at image
    /// positions, transformers' processor writes `image_token_index` there.
    pub fn reference_ids(&self, ids: &[i64]) -> Vec<i64> {
        match self.image.processing {
            Processing::Llava => ids.to_vec(),
            Processing::Transformers => {
                ids.iter().map(|&i| if i == IMAGE_TOKEN_INDEX { self.image_token_id } else { i }).collect()
            }
        }
    }

    /// Index into CLIP's hidden states (0 = embeddings) of the layer whose output feeds the projector.
    pub fn vision_layer_index(&self) -> Result<usize> {
        let n = self.vision.num_hidden_layers as i64;
        let idx =
            if self.vision_feature_layer < 0 { n + 1 + self.vision_feature_layer } else { self.vision_feature_layer };
        if !(0..=n).contains(&idx) {
            return Err(Error::Config(format!(
                "vision_feature_layer {} is outside the {n} CLIP layers",
                self.vision_feature_layer
            )));
        }
        Ok(idx as usize)
    }
}

fn pairs(p: &[[u32; 2]]) -> Vec<(u32, u32)> {
    p.iter().map(|[h, w]| (*h, *w)).collect()
}

impl LlavaConfig {
    /// Whether this is LLaVA-1.5 (`LlavaForConditionalGeneration`: one centre-cropped tile, no `image_newline`)
    /// rather than LLaVA-NeXT.
    pub fn is_llava_one_five(&self) -> bool {
        self.image.aspect_mode == AspectMode::CenterCrop
    }

    fn strategy_name(&self) -> &'static str {
        match self.feature_select {
            FeatureSelect::Patch => "default",
            FeatureSelect::Full => "full",
        }
    }

    /// The llava-hf `config.json` of this model (what transformers' `LlavaNextForConditionalGeneration`, or
    /// `LlavaForConditionalGeneration` for LLaVA-1.5, reads).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut text = serde_json::to_value(&self.text).expect("serialisable");
        text["model_type"] = self.text.family.model_type().into();
        match self.eos_token_ids.as_slice() {
            [] => {}
            [id] => text["eos_token_id"] = (*id).into(),
            ids => text["eos_token_id"] = ids.into(),
        }
        let mut vision = serde_json::to_value(&self.vision).expect("serialisable");
        vision["model_type"] = "clip_vision_model".into();
        vision["projection_dim"] = self.vision.hidden_size.into();
        let mut config = serde_json::json!({
            "architectures": ["LlavaNextForConditionalGeneration"],
            "model_type": "llava_next",
            "image_token_index": self.image_token_id,
            "image_seq_length": (self.vision.image_size / self.vision.patch_size).pow(2),
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.strategy_name(),
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "text_config": text,
            "vision_config": vision,
        });
        if self.is_llava_one_five() {
            config["architectures"] = serde_json::json!(["LlavaForConditionalGeneration"]);
            config["model_type"] = "llava".into();
        } else {
            let pinpoints: Vec<[u32; 2]> = self.image.grid_pinpoints.iter().map(|&(h, w)| [h, w]).collect();
            config["image_grid_pinpoints"] = serde_json::json!(pinpoints);
        }
        config
    }

    /// `preprocessor_config.json` and `processor_config.json` as llava-hf ships them for this model.
    pub fn processor_json(&self) -> [(&'static str, serde_json::Value); 2] {
        let img = &self.image;
        let (image_processor, processor) = if self.is_llava_one_five() {
            ("CLIPImageProcessor", "LlavaProcessor")
        } else {
            ("LlavaNextImageProcessor", "LlavaNextProcessor")
        };
        let mut preprocessor = serde_json::json!({
            "image_processor_type": image_processor,
            "processor_class": processor,
            "crop_size": {"height": img.crop_size, "width": img.crop_size},
            "size": {"shortest_edge": img.shortest_edge},
            "do_center_crop": true,
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": img.image_mean,
            "image_std": img.image_std,
            "resample": 3,
            "rescale_factor": 1.0 / 255.0,
        });
        if !self.is_llava_one_five() {
            let pinpoints: Vec<[u32; 2]> = img.grid_pinpoints.iter().map(|&(h, w)| [h, w]).collect();
            preprocessor["do_pad"] = true.into();
            preprocessor["image_grid_pinpoints"] = serde_json::json!(pinpoints);
        }
        [
            ("preprocessor_config.json", preprocessor),
            (
                "processor_config.json",
                serde_json::json!({
                    "processor_class": processor,
                    "image_token": "<image>",
                    "num_additional_image_tokens": 1,
                    "patch_size": self.vision.patch_size,
                    "vision_feature_select_strategy": self.strategy_name(),
                }),
            ),
        ]
    }
}
#[cfg(test)]
mod tests {
    use super::{check_llava_next_sections, eos_token_ids, is_llava_hf, rope_theta, DecoderFamily, TextSettings};
    use serde_json::json;

    #[test]
    fn the_stop_ids_are_generation_configs_then_the_decoders() {
        let dir = tempfile::tempdir().unwrap();
        let section = |value: serde_json::Value| value.as_object().unwrap().clone();
        let ids = |text: serde_json::Value| eos_token_ids(dir.path(), &section(text), "text_config.");
        assert_eq!(ids(json!({})).unwrap(), Vec::<i64>::new());
        assert_eq!(ids(json!({"eos_token_id": 7})).unwrap(), [7]);
        assert_eq!(ids(json!({"eos_token_id": [2, 7]})).unwrap(), [2, 7]);
        std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [7, 9]}"#).unwrap();
        assert_eq!(ids(json!({"eos_token_id": 2})).unwrap(), [7, 9]);
        std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": null}"#).unwrap();
        assert_eq!(ids(json!({"eos_token_id": 2})).unwrap(), [2]);
        let error = ids(json!({"eos_token_id": "</s>"})).unwrap_err().to_string();
        assert!(error.contains("config.json: text_config.eos_token_id is \"</s>\", not a token id"), "{error}");
    }

    #[test]
    fn model_type_llava_is_llava_hf_only_with_its_sections_or_architecture() {
        assert!(is_llava_hf(&json!({"model_type": "llava", "text_config": {}, "vision_config": {}})));
        assert!(is_llava_hf(&json!({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]})));
        let original = json!({"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": 4096});
        assert!(!is_llava_hf(&original));
    }

    fn text(family: DecoderFamily, section: serde_json::Value) -> super::TextConfig {
        serde_json::from_value::<TextSettings>(section).expect("a text section").resolve(family)
    }

    #[test]
    fn absent_settings_take_the_defaults_of_the_family() {
        let mistral = text(DecoderFamily::Mistral, json!({}));
        assert_eq!(
            (mistral.intermediate_size, mistral.num_key_value_heads, mistral.sliding_window),
            (14336, 8, Some(4096))
        );
        assert_eq!((mistral.max_position_embeddings, mistral.rope_theta), (4096 * 32, 10000.0));
        let llama = text(DecoderFamily::Llama, json!({"num_attention_heads": 40}));
        assert_eq!((llama.intermediate_size, llama.num_key_value_heads, llama.sliding_window), (11008, 40, None));
        assert_eq!((llama.max_position_embeddings, llama.rope_theta), (2048, 10000.0));
        assert!(!llama.tie_word_embeddings);
    }

    #[test]
    fn explicit_nulls_read_as_transformers_reads_them() {
        let mistral = text(DecoderFamily::Mistral, json!({"num_key_value_heads": null, "sliding_window": null}));
        assert_eq!((mistral.num_key_value_heads, mistral.sliding_window), (32, None));
        let llama = text(DecoderFamily::Llama, json!({"num_key_value_heads": 8, "sliding_window": null}));
        assert_eq!((llama.num_key_value_heads, llama.sliding_window), (8, None));
        assert!(serde_json::from_value::<TextSettings>(json!({"intermediate_size": null})).is_err());
    }

    #[test]
    fn the_decoder_family_comes_from_text_config_model_type() {
        let config = |text: serde_json::Value| json!({"text_config": text, "vision_config": {}});
        assert_eq!(check_llava_next_sections(&config(json!({"model_type": "mistral"}))), Ok(DecoderFamily::Mistral));
        assert_eq!(check_llava_next_sections(&config(json!({"model_type": "llama"}))), Ok(DecoderFamily::Llama));
        assert_eq!(check_llava_next_sections(&config(json!({}))), Ok(DecoderFamily::Llama));
        let refused = check_llava_next_sections(&config(json!({"model_type": "qwen2"}))).unwrap_err();
        assert!(refused.contains("'qwen2'") && refused.contains("mistral or llama"), "{refused}");
        let windowed = json!({"model_type": "llama", "sliding_window": 4096});
        assert!(check_llava_next_sections(&config(windowed)).unwrap_err().contains("a Llama decoder has none"));
        let unwindowed = json!({"model_type": "llama", "sliding_window": null});
        assert_eq!(check_llava_next_sections(&config(unwindowed)), Ok(DecoderFamily::Llama));
    }

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
        assert!(theta(json!({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 1e4}}))
            .unwrap_err()
            .contains("make them equal"));
        assert!(theta(json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}))
            .unwrap_err()
            .contains("llama3"));
        assert!(theta(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap_err().contains("linear"));
        assert!(theta(json!({"rope_parameters": "default"})).unwrap_err().contains("must be an object"));
    }
}
