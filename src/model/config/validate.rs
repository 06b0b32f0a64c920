//! What stic refuses in a config, and why: settings it does not run, sizes that cannot be, RoPE in both
//! transformers versions' spellings.
use std::path::Path;

use crate::error::{Error, Result};
use crate::image::ImageConfigError;

use super::{DecoderFamily, Layout, LlavaConfig, TextConfig, VisionConfig};

/// Values of a setting that leave the computation as stic does it.
#[derive(Clone, Copy)]
pub(super) enum Inert {
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
                Inert::Empty => {
                    value.as_object().is_some_and(|m| m.is_empty()) || value.as_array().is_some_and(|a| a.is_empty())
                }
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

pub(super) type Section = serde_json::Map<String, serde_json::Value>;

/// Settings transformers honours that change the computation and that stic does not implement.
pub(super) const TEXT_SETTINGS: &[(&str, Inert)] = &[
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
const LLAVA_NEXT_SETTINGS: &[(&str, Inert)] =
    &[("quantization_config", Inert::Null), ("multimodal_projector_bias", Inert::True)];

pub(super) fn refuse_unsupported(
    section: &Section,
    place: &str,
    settings: &[(&str, Inert)],
) -> std::result::Result<(), String> {
    for &(key, inert) in settings {
        if let Some(value) = section.get(key).filter(|v| !inert.holds(v)) {
            let hint =
                if key == "quantization_config" { " (save the checkpoint dequantized, e.g. in bf16)" } else { "" };
            return Err(format!(
                "{place}{key} is {value}, which changes what the model computes; stic implements only {}{hint}",
                inert.describe()
            ));
        }
    }
    Ok(())
}

/// `text_config` and `vision_config` of a llava-hf config, checked before serde fills in defaults: a section that is
/// not an object, or of another architecture, would otherwise become the 7B defaults. Returns the decoder family.
pub(super) fn check_llava_next_sections(raw: &serde_json::Value) -> std::result::Result<DecoderFamily, String> {
    let section = |key: &str, what: &str| match raw.get(key) {
        Some(serde_json::Value::Object(map)) => Ok(map),
        Some(other) => Err(format!("{key} is {other}; it must be an object with the {what} settings")),
        None => Err(format!("there is no {key} (the {what} settings)")),
    };
    let text = section("text_config", "decoder")?;
    // transformers reads a section without model_type as a LlamaConfig
    let family = match text.get("model_type").and_then(|v| v.as_str()) {
        Some("mistral") => DecoderFamily::Mistral,
        Some("llama") | None => DecoderFamily::Llama,
        Some(other) => {
            return Err(format!(
            "text_config.model_type is '{other}': stic runs Mistral and Llama decoders only (text_config.model_type \
                 mistral or llama)"
        ))
        }
    };
    if let Some(window) = text.get("sliding_window").filter(|w| family == DecoderFamily::Llama && !w.is_null()) {
        return Err(format!(
            "text_config.sliding_window is {window}, but a Llama decoder has none (transformers' Llama attends to \
             every token in one forward pass yet keeps only the window in its generation cache): remove it, or set \
             text_config.model_type to mistral if the model was trained with a window"
        ));
    }
    let vision = section("vision_config", "CLIP vision tower")?;
    if let Some(kind) = vision.get("model_type").and_then(|v| v.as_str()).filter(|k| *k != "clip_vision_model") {
        return Err(format!(
            "vision_config.model_type is '{kind}': stic runs CLIP vision towers only (clip_vision_model)"
        ));
    }
    refuse_unsupported(vision, "vision_config.", VISION_SETTINGS)?;
    refuse_unsupported(raw.as_object().expect("an object with sections"), "", LLAVA_NEXT_SETTINGS)?;
    Ok(family)
}

/// The RoPE base of a text section, when the section sets one. transformers 4 reads `rope_theta` and applies
/// `rope_scaling`; transformers 5 writes `rope_parameters: {rope_type, rope_theta}` instead (and prefers it). Only
/// the unscaled rotation (`rope_type` default) is implemented.
pub(super) fn rope_theta(section: &Section, place: &str) -> std::result::Result<Option<f64>, String> {
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
                other => {
                    return Err(format!(
                        "{place}{key}.{other} is {value}: stic knows only rope_type and rope_theta there"
                    ))
                }
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
    pub(super) fn validate(&self, place: &str) -> std::result::Result<(), String> {
        none_zero(
            place,
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.num_key_value_heads),
                ("vocab_size", self.vocab_size),
                ("max_position_embeddings", self.max_position_embeddings),
                ("sliding_window", self.sliding_window.unwrap_or(1)),
            ],
        )?;
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "{place}num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        let head_dim = self.head_dim();
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
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
    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        none_zero(
            "vision_config.",
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads", self.num_attention_heads),
                ("patch_size", self.patch_size),
            ],
        )?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "vision_config.hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.image_size < self.patch_size {
            return Err(format!(
                "vision_config.image_size {} is smaller than its patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(format!("vision_config.layer_norm_eps is {}; it must be a number ≥ 0", self.layer_norm_eps));
        }
        Ok(())
    }
}

impl LlavaConfig {
    /// Checks the values of config.json that size tensors or divide, so that no command panics on them later.
    pub(super) fn validate(&self, text_place: &str) -> std::result::Result<(), String> {
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
    pub(super) fn check_image_settings(&self, pinpoints_file: &Path, processor_file: &Path) -> Result<()> {
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
