//! LLaVA-NeXT: CLIP tower + projector + a Mistral or Llama decoder, with anyres tiles packed and unpadded as
//! transformers or LLaVA's code does (`ImageConfig::processing`), or laid out flat (`mm_patch_merge_type flat`).
use std::path::Path;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

use super::clip::{ClipVisionTower, LAYER_LINEARS, VISION_MODEL};
use super::config::{check_tower_agrees, FeatureSelect, LlavaConfig, VisionConfig, VisionTower};
use super::decoder::DecoderModel;
use super::geometry::random_tensors;
use super::projector::Projector;
use super::weights::{Checkpoint, Vb, WeightSource};
use crate::error::{Error, Result};
use crate::image::{anyres, AspectMode, PatchMerge, Preprocessed, Processing};
use crate::model::lora::LoraSwitch;
use crate::text::tokenizer::IMAGE_TOKEN_INDEX;

pub struct LlavaNext {
    pub vision_tower: ClipVisionTower,
    pub multi_modal_projector: Projector,
    /// The projector as loaded, kept when an adapter trains it in full: with the adapter switched off the model
    /// is exactly the base model again (the DPO reference policy).
    pub original_projector: Option<Projector>,
    pub adapter_switch: Option<Rc<LoraSwitch>>,
    /// LLaVA-NeXT's row separator; LLaVA-1.5 has none.
    pub image_newline: Option<Tensor>,
    pub language_model: DecoderModel,
    pub cfg: LlavaConfig,
}

/// The original LLaVA config has no vision section: read the CLIP geometry off the tensor shapes.
fn infer_vision_config(ckpt: &Checkpoint, base: &VisionConfig) -> Result<VisionConfig> {
    let prefix = format!("{VISION_MODEL}.");
    let shape = |name: &str| {
        ckpt.shape(&format!("{prefix}{name}"))
            .ok_or_else(|| Error::Weights(format!("missing tensor {prefix}{name} (needed to infer the CLIP config)")))
    };
    let patch = shape("embeddings.patch_embedding.weight")?;
    let positions = shape("embeddings.position_embedding.weight")?;
    let fc1 = shape("encoder.layers.0.mlp.fc1.weight")?;
    let layer_prefix = format!("{prefix}encoder.layers.");
    let num_layers = ckpt
        .names()
        .filter_map(|n| n.strip_prefix(&layer_prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let hidden = patch[0] as usize;
    let patch_size = patch[2] as usize;
    let grid = ((positions[0] - 1) as f64).sqrt() as usize;
    Ok(VisionConfig {
        hidden_size: hidden,
        intermediate_size: fc1[0] as usize,
        num_hidden_layers: num_layers,
        num_attention_heads: (hidden / 64).max(1),
        image_size: grid * patch_size,
        patch_size,
        ..base.clone()
    })
}

/// Completes an original-layout checkpoint with its CLIP tower, as LLaVA's `CLIPVisionTower` loads it: the
/// tower's tensors from its own folder when the checkpoint holds none (LLaVA-v1.5), and the tower's geometry from
/// that folder's config (checked against the tensors) or, without the folder, from the tensors.
pub fn complete_vision_config(cfg: &mut LlavaConfig, ckpt: &mut Checkpoint, config_path: &Path) -> Result<()> {
    let Some(tower) = &cfg.vision_tower else { return Ok(()) };
    let holds_tower = ckpt.contains(&format!("{VISION_MODEL}.embeddings.patch_embedding.weight"));
    match tower {
        VisionTower::Folder(dir) => {
            if !holds_tower {
                // a `CLIPVisionModel` or `CLIPModel` folder: its `vision_model.*` tensors, not a CLIPModel's text side
                ckpt.add_renamed(dir, "vision_model.", &format!("{VISION_MODEL}."))?;
            }
            check_tower_agrees(&cfg.vision, &infer_vision_config(ckpt, &cfg.vision)?, dir)?;
        }
        VisionTower::NotFound(name) if !holds_tower => {
            return Err(Error::Config(VisionTower::not_found_advice(name, config_path)));
        }
        VisionTower::NotFound(_) => {
            cfg.vision = infer_vision_config(ckpt, &cfg.vision)?;
            cfg.image.crop_size = cfg.vision.image_size as u32;
            cfg.image.shortest_edge = cfg.vision.image_size as u32;
            cfg.vision_config_known = true;
        }
    }
    Ok(())
}

/// A tensor of a vision-tower layer that LLaVA never reads (past the feature layer), or a buffer that older
/// saves wrote: present in real checkpoints, not needed.
fn may_be_unused(name: &str, built_vision_layers: usize) -> bool {
    let layer = name
        .strip_prefix(VISION_MODEL)
        .and_then(|r| r.strip_prefix(".encoder.layers."))
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok());
    layer.is_some_and(|i| i >= built_vision_layers)
        || name.starts_with(&format!("{VISION_MODEL}.post_layernorm."))
        || name.ends_with(".inv_freq")
        || name.ends_with("embeddings.position_ids")
}

/// Whether `module` is a linear layer of a CLIP encoder layer that is not built (LLaVA never runs it).
pub fn is_unbuilt_vision_linear(module: &str, cfg: &LlavaConfig) -> Result<bool> {
    let Some(rest) = module.strip_prefix(VISION_MODEL).and_then(|r| r.strip_prefix(".encoder.layers.")) else {
        return Ok(false);
    };
    let Some((layer, linear)) = rest.split_once('.') else { return Ok(false) };
    let Ok(layer) = layer.parse::<usize>() else { return Ok(false) };
    Ok(layer >= cfg.vision_layer_index()? && layer < cfg.vision.num_hidden_layers && LAYER_LINEARS.contains(&linear))
}

/// LLaVA builds `image_newline` for the spatial_unpad merge only (LLaVA-v1.5 has none, nor llava-hf's
/// LLaVA-1.5); the flat merge never reads it.
fn image_newline(vb: &Vb, cfg: &LlavaConfig) -> Option<Tensor> {
    (cfg.image.patch_merge != PatchMerge::Flat || vb.contains("image_newline"))
        .then(|| vb.get(&[cfg.text.hidden_size as i64], "image_newline"))
}

impl LlavaNext {
    /// Loads the weights of a model folder whose config is `cfg` (`LlavaConfig::from_dir`).
    pub fn load(dir: &Path, mut cfg: LlavaConfig, kind: Kind, device: Device) -> Result<Self> {
        let mut ckpt = Checkpoint::open_dir(dir)?;
        complete_vision_config(&mut cfg, &mut ckpt, &dir.join("config.json"))?;
        Self::from_checkpoint(cfg, &ckpt, kind, device)
    }

    pub fn from_checkpoint(cfg: LlavaConfig, ckpt: &Checkpoint, kind: Kind, device: Device) -> Result<Self> {
        Self::from_source(cfg, WeightSource::new(ckpt, kind, device))
    }

    /// A model of `cfg` with the weights `init-tiny` would draw from `seed`, made on `device` in `kind` (never
    /// written anywhere).
    pub fn random(cfg: LlavaConfig, seed: i64, kind: Kind, device: Device) -> Result<Self> {
        tch::manual_seed(seed);
        let tensors = random_tensors(&cfg, kind, device);
        Self::from_source(cfg, WeightSource::from_tensors(tensors, kind, device))
    }

    fn from_source(cfg: LlavaConfig, source: WeightSource) -> Result<Self> {
        let vb = source.root();
        let model = tch::no_grad(|| -> Result<Self> {
            Ok(LlavaNext {
                vision_tower: ClipVisionTower::new(
                    &vb.pp("vision_tower.vision_model"),
                    &cfg.vision,
                    cfg.vision_layer_index()?,
                ),
                multi_modal_projector: Projector::new(
                    &vb.pp("multi_modal_projector"),
                    cfg.vision.hidden_size,
                    cfg.text.hidden_size,
                ),
                original_projector: None,
                adapter_switch: None,
                image_newline: image_newline(&vb, &cfg),
                language_model: DecoderModel::new(&vb.pp("language_model"), &cfg.text),
                cfg,
            })
        })?;
        let built = model.vision_tower.num_layers();
        source.finish(|name| may_be_unused(name, built))?;
        Ok(model)
    }

    pub fn device(&self) -> Device {
        self.language_model.embed_tokens.device()
    }

    pub fn kind(&self) -> Kind {
        self.language_model.embed_tokens.kind()
    }

    /// The frozen CLIP tower's selected hidden states of every tile, [tiles, patches, vision_hidden] (no graph; no
    /// adapter reaches the tower, so the DPO reference and policy passes can share them).
    pub fn tower_features(&self, image: &Preprocessed) -> Tensor {
        let hidden = tch::no_grad(|| self.vision_tower.forward(&image.pixel_tensor().to_device(self.device())));
        match self.cfg.feature_select {
            FeatureSelect::Patch => hidden.narrow(1, 1, hidden.size()[1] - 1),
            FeatureSelect::Full => hidden,
        }
    }

    /// The image's feature sequence as the decoder sees it: base tile, then the unpadded grid with one
    /// `image_newline` per row (anyres), or the single tile plus one newline; with the flat merge, and for pad
    /// mode in LLaVA's code (which hands such images to the tower as one batch and never merges them), the
    /// tiles' features one after the other.
    pub fn image_features(&self, image: &Preprocessed) -> Result<Tensor> {
        self.image_features_from_tower(image, &self.tower_features(image))
    }

    /// `image_features` from the tower's output (`tower_features`).
    pub fn image_features_from_tower(&self, image: &Preprocessed, tower: &Tensor) -> Result<Tensor> {
        let adapter_off = self.adapter_switch.as_ref().is_some_and(|s| !s.enabled());
        let features = match &self.original_projector {
            Some(original) if adapter_off => original.forward(tower),
            _ => self.multi_modal_projector.forward(tower),
        };
        let (tiles, patches, dim) = features.size3().unwrap();
        let img = &self.cfg.image;
        if matches!(
            (img.aspect_mode, img.patch_merge, img.processing),
            (AspectMode::Pad, _, Processing::Llava) | (AspectMode::CenterCrop, _, _) | (_, PatchMerge::Flat, _)
        ) {
            return Ok(features.flatten(0, 1));
        }
        let Some(image_newline) = &self.image_newline else {
            return Err(Error::Config("this model has no image_newline, which the spatial_unpad merge needs".into()));
        };
        let newline = image_newline.view([1, dim]).to_kind(features.kind());
        if tiles == 1 {
            return Ok(Tensor::cat(&[features.get(0), newline], 0));
        }
        if img.aspect_mode == AspectMode::Pad {
            return Err(Error::Input(format!("pad mode gives one tile, got {tiles}")));
        }
        let side = (self.cfg.vision.image_size / self.cfg.vision.patch_size) as i64;
        if patches != side * side {
            return Err(Error::Config(format!(
                "anyres needs {} patches per tile, the vision tower gives {patches} (vision_feature_select_strategy 'full' is not supported with anyres)",
                side * side
            )));
        }
        let (rows, cols) = anyres::grid_shape(image.original_size, img);
        let (rows, cols) = (rows as i64, cols as i64);
        if rows * cols != tiles - 1 {
            return Err(Error::Input(format!("image has {} grid tiles, the pinpoints give {rows}x{cols}", tiles - 1)));
        }
        let grid = features
            .narrow(0, 1, tiles - 1)
            .view([rows, cols, side, side, dim])
            .permute([4, 0, 2, 1, 3])
            .reshape([dim, rows * side, cols * side]);
        let (r0, r1, c0, c1) = anyres::unpadded_size(
            ((rows * side) as usize, (cols * side) as usize),
            image.original_size,
            img.processing,
        );
        let grid = grid.narrow(1, r0 as i64, (r1 - r0) as i64).narrow(2, c0 as i64, (c1 - c0) as i64);
        let h = grid.size()[1];
        let with_newlines = Tensor::cat(&[grid, newline.view([dim, 1, 1]).expand([dim, h, 1], false)], 2);
        let unpadded = with_newlines.flatten(1, 2).transpose(0, 1);
        Ok(Tensor::cat(&[features.get(0), unpadded], 0))
    }

    /// Token embeddings with every image position ([`IMAGE_TOKEN_INDEX`]) filled, in order, by the rows of
    /// `image_features`.
    pub fn embed_inputs(&self, input_ids: &Tensor, image_features: &[Tensor]) -> Result<Tensor> {
        let embeds = self.language_model.embed(input_ids);
        let is_image = input_ids.eq(IMAGE_TOKEN_INDEX);
        let placeholders = is_image.sum(Kind::Int64).int64_value(&[]);
        let provided: i64 = image_features.iter().map(|f| f.size()[0]).sum();
        if placeholders != provided {
            return Err(Error::Input(format!(
                "the prompt has {placeholders} image tokens but the images give {provided} features"
            )));
        }
        if provided == 0 {
            return Ok(embeds);
        }
        let features = Tensor::cat(image_features, 0).to_kind(embeds.kind());
        Ok(embeds.masked_scatter(&is_image.unsqueeze(-1).expand_as(&embeds), &features))
    }
}
