//! `config.json` of the original LLaVA layout (haotian-liu/LLaVA's `LlavaMistralForCausalLM`,
//! `LlavaLlamaForCausalLM`).
use serde::Deserialize;
use std::path::Path;

use crate::error::{Error, Result};
use crate::image::{AspectMode, ImageConfig, PatchMerge, Processing};

use super::tower::{read_tower_config, VisionTower};
use super::{defaults, feature_select, pairs, DecoderFamily, Layout, LlavaConfig, TextSettings, VisionConfig};

#[derive(Deserialize)]
pub(super) struct OriginalConfig {
    #[serde(flatten)]
    text: TextSettings,
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
    #[serde(default)]
    architectures: Vec<String>,
}

/// The decoder of an original checkpoint, as LLaVA's classes register them: `llava_mistral` is
/// `LlavaMistralForCausalLM`; `llava_llama` (and `llava`, its name before LLaVA-v1.6) is `LlavaLlamaForCausalLM`,
/// unless `architectures` names the Mistral class.
fn original_family(model_type: &str, architectures: &[String]) -> DecoderFamily {
    if model_type == "llava_mistral" || architectures.iter().any(|a| a == "LlavaMistralForCausalLM") {
        DecoderFamily::Mistral
    } else {
        DecoderFamily::Llama
    }
}

/// The config of an original LLaVA checkpoint (`LlavaMistralForCausalLM`, `LlavaLlamaForCausalLM`), with every
/// setting that changes the maths mapped or refused: LLaVA's code reads these with defaults of its own
/// (`mm_patch_merge_type` flat, `mm_projector_type` linear), which apply here too. The tower's geometry comes from
/// its own folder when that is found, else from the checkpoint's tensors (`complete_vision_config`).
pub(super) fn original_config(orig: OriginalConfig, model_type: &str, path: &Path) -> Result<LlavaConfig> {
    let unsupported = |what: String| Err(Error::Config(format!("{}: {what}", path.display())));
    let Some(tower) = orig.mm_vision_tower.as_deref() else {
        return unsupported("no mm_vision_tower: not a LLaVA multimodal checkpoint (a plain language model?)".into());
    };
    if !tower.to_ascii_lowercase().contains("clip") && !Path::new(tower).exists() {
        return unsupported(format!(
            "mm_vision_tower '{tower}' is not a CLIP tower (stic runs CLIP ViT towers, as LLaVA-v1.6 has)"
        ));
    }
    match orig.mm_projector_type.as_deref() {
        Some("mlp2x_gelu") => {}
        Some(kind) => return unsupported(format!("mm_projector_type '{kind}' is not supported (only mlp2x_gelu)")),
        None => return unsupported("no mm_projector_type (LLaVA then builds a linear projector, which stic does not support; LLaVA-v1.6 uses mlp2x_gelu)".into()),
    }
    let patch_merge = match orig.mm_patch_merge_type.as_deref() {
        Some("spatial_unpad") => PatchMerge::SpatialUnpad,
        Some("flat") | None => PatchMerge::Flat,
        Some(kind) => {
            return unsupported(format!("mm_patch_merge_type '{kind}' is not supported (spatial_unpad or flat)"))
        }
    };
    let aspect_mode =
        match orig.image_aspect_ratio.as_deref() {
            Some("anyres") => AspectMode::Anyres,
            Some("pad") => AspectMode::Pad,
            Some(kind) => return unsupported(format!("image_aspect_ratio '{kind}' is not supported (anyres or pad)")),
            None => return unsupported(
                "no image_aspect_ratio (LLaVA then center-crops a square, which stic does not support: anyres or pad)"
                    .into(),
            ),
        };
    if orig.mm_use_im_start_end || orig.mm_use_im_patch_token {
        return unsupported("mm_use_im_start_end / mm_use_im_patch_token add image tokens to the vocabulary, which stic does not support".into());
    }
    let feature_select = feature_select(orig.mm_vision_select_feature.as_deref().unwrap_or("patch"), path)?;
    let vision_tower = VisionTower::locate(tower);
    let vision = match &vision_tower {
        VisionTower::Folder(dir) => read_tower_config(dir)?,
        VisionTower::NotFound(_) => {
            VisionConfig { hidden_size: orig.mm_hidden_size.unwrap_or(1024), ..defaults::clip_vit_l_336() }
        }
    };
    Ok(LlavaConfig {
        layout: Layout::OriginalLlava,
        text: orig.text.resolve(original_family(model_type, &orig.architectures)),
        vision_config_known: matches!(vision_tower, VisionTower::Folder(_)),
        vision_tower: Some(vision_tower),
        vision,
        image: ImageConfig {
            grid_pinpoints: pairs(&orig.image_grid_pinpoints),
            aspect_mode,
            processing: Processing::Llava,
            patch_merge,
            ..ImageConfig::default()
        },
        // llava-hf's id for `<image>`; the session sets the one its tokenizer gives (`appended_image_id`)
        image_token_id: defaults::image_token_index(),
        vision_feature_layer: orig.mm_vision_select_layer,
        feature_select,
        projector_hidden_act: defaults::gelu(),
        llava_max_length: orig.tokenizer_model_max_length,
        eos_token_ids: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::{original_family, DecoderFamily};

    #[test]
    fn the_decoder_family_follows_llavas_classes() {
        let mistral = ["LlavaMistralForCausalLM".to_string()];
        let llama = ["LlavaLlamaForCausalLM".to_string()];
        assert_eq!(original_family("llava_mistral", &[]), DecoderFamily::Mistral);
        assert_eq!(original_family("llava_llama", &llama), DecoderFamily::Llama);
        assert_eq!(original_family("llava", &llama), DecoderFamily::Llama);
        assert_eq!(original_family("llava", &[]), DecoderFamily::Llama);
        assert_eq!(original_family("llava", &mistral), DecoderFamily::Mistral);
    }
}
