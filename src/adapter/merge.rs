//! `stic merge`: folds a LoRA adapter (and a trained projector) into the base weights and writes an ordinary
//! llava-hf checkpoint that transformers loads without PEFT. From an original LLaVA checkpoint it converts as
//! transformers' `convert_llava_next_weights_to_hf.py` (anyres: LLaVA-NeXT) or `convert_llava_weights_to_hf.py`
//! (pad mode: LLaVA-1.5) does: llava-hf tensor names, the CLIP tower's tensors (from its own folder when the
//! checkpoint has none), `<image>` and `<pad>` added to the tokenizer, the embeddings grown to a multiple of 64
//! rows, and the processor files of the llava-hf model.
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

use crate::adapter::{Adapter, AdapterFile};
use crate::error::{Error, Result};
use crate::fsutil::{write_atomic, write_dir_atomic};
use crate::image::{AspectMode, ImageConfig, PatchMerge};
use crate::model::config::Layout;
use crate::model::llava_next::complete_vision_config;
use crate::model::tiny::{write_config_files, write_json, write_model_files};
use crate::model::weights::{save_safetensors, Checkpoint};
use crate::model::{LlavaConfig, LlavaNext};
use crate::text::slow_tokenizer::SlowTokenizer;

/// Shards of at most this many bytes, like transformers' default `max_shard_size`.
const SHARD_BYTES: usize = 5 << 30;

const EMBED: &str = "language_model.model.embed_tokens.weight";
const LM_HEAD: &str = "language_model.lm_head.weight";
const IMAGE_NEWLINE: &str = "image_newline";

pub fn merge_adapter(model_dir: &Path, adapter_dir: &Path, output: &Path) -> Result<()> {
    if output.exists() && std::fs::read_dir(output).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::Input(format!(
            "{} exists and is not empty: choose a new --output folder",
            output.display()
        )));
    }
    let mut cfg = LlavaConfig::from_dir(model_dir, None)?;
    let mut ckpt = Checkpoint::open_dir(model_dir)?;
    complete_vision_config(&mut cfg, &mut ckpt, &model_dir.join("config.json"))?;
    let original = cfg.layout == Layout::OriginalLlava;
    let hf_image =
        if original { llava_hf_image(&cfg.image, &model_dir.join("config.json"))? } else { cfg.image.clone() };
    let stored = ckpt.kind_of(EMBED).unwrap_or(Kind::Float);
    // Building the model with the adapter checks every tensor and every LoRA pair against the architecture.
    {
        let mut model = LlavaNext::from_checkpoint(cfg.clone(), &ckpt, stored, Device::Cpu)?;
        Adapter::load(&mut model, adapter_dir, false)?;
    }
    // LLaVA-1.5 in llava-hf has no image_newline (LLaVA builds one for spatial_unpad, and pad mode never reads it).
    let dropped: &[&str] =
        if original && hf_image.aspect_mode == AspectMode::CenterCrop { &[IMAGE_NEWLINE] } else { &[] };
    let tokenizer = if original { Some(extended_tokenizer(model_dir, &cfg)?) } else { None };
    let adapter = AdapterFile::read(adapter_dir, Device::Cpu)?;
    let mut merged: HashMap<String, Tensor> = HashMap::new();
    for (module, (a, b)) in &adapter.pairs {
        let name = format!("{module}.weight");
        let weight = ckpt
            .load(&name, Kind::Float, Device::Cpu)?
            .ok_or_else(|| Error::Weights(format!("missing tensor {name}")))?;
        merged.insert(name, (weight + adapter.delta_weight(a, b)).to_kind(stored));
    }
    for (name, tensor) in &adapter.projector {
        merged.insert(name.clone(), tensor.to_kind(stored));
    }
    // All or nothing: a full disk leaves no output folder without (all) weights.
    write_dir_atomic(output, |staging| {
        match &tokenizer {
            Some((tok, image_id)) => {
                let old_vocab = cfg.text.vocab_size as i64;
                let new_vocab = (old_vocab + 2 + 63) / 64 * 64;
                grow_vocabulary(&ckpt, &mut merged, old_vocab, new_vocab, stored)?;
                cfg.text.vocab_size = new_vocab as usize;
                cfg.image_token_id = *image_id;
                cfg.image = hf_image;
                write_config_files(staging, &cfg)?;
                let mut config = cfg.to_hf_json();
                config["pad_token_id"] = tok.vocab_id("<pad>").expect("added").into();
                write_json(&staging.join("config.json"), &config)?;
                write_json(&staging.join("tokenizer.json"), &tok.tokenizer_json()?)?;
                for (name, value) in tok.config_files("<pad>") {
                    write_json(&staging.join(name), &value)?;
                }
                let model_file = model_dir.join("tokenizer.model");
                let bytes = std::fs::read(&model_file).map_err(|e| Error::io(&model_file, e))?;
                write_atomic(&staging.join("tokenizer.model"), &bytes)?;
            }
            None => write_model_files(staging, &cfg)?,
        }
        write_weights(staging, &ckpt, merged, dropped, stored)
    })
}

/// The image settings of the llava-hf model an original checkpoint becomes. Pad mode runs one tile of 576
/// features whatever `mm_patch_merge_type` says (LLaVA's code merges only the tiles of anyres): that is LLaVA-1.5,
/// whose `CLIPImageProcessor` centre-crops rather than pads, as `convert_llava_weights_to_hf.py` writes it (the
/// same pixels for square images). Anyres with spatial_unpad is LLaVA-NeXT.
fn llava_hf_image(image: &ImageConfig, config_path: &Path) -> Result<ImageConfig> {
    match (image.aspect_mode, image.patch_merge) {
        (AspectMode::Pad, _) => {
            Ok(ImageConfig { aspect_mode: AspectMode::CenterCrop, patch_merge: PatchMerge::Flat, ..image.clone() })
        }
        (AspectMode::Anyres, PatchMerge::Flat) => Err(Error::Input(format!(
            "{}: anyres with the flat merge (every tile's features in a row, no unpadding, no image_newline) has no \
             llava-hf equivalent: LLaVA-NeXT always unpads with image_newline, LLaVA-1.5 has one tile; merge a \
             checkpoint with image_aspect_ratio pad or mm_patch_merge_type spatial_unpad",
            config_path.display()
        ))),
        _ => Ok(image.clone()),
    }
}

/// Writes the base tensors of `ckpt` but `dropped`, with those of `merged` in their place, in shards as
/// transformers does.
fn write_weights(
    output: &Path,
    ckpt: &Checkpoint,
    mut merged: HashMap<String, Tensor>,
    dropped: &[&str],
    stored: Kind,
) -> Result<()> {
    let mut names: Vec<String> = ckpt.names().filter(|name| !dropped.contains(&name.as_str())).cloned().collect();
    names.sort();
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    for name in names {
        let tensor = match merged.remove(&name) {
            Some(t) => t,
            None => ckpt.load(&name, stored, Device::Cpu)?.expect("listed tensor"),
        };
        let bytes = tensor.numel() * tensor.kind().elt_size_in_bytes();
        if shard_bytes + bytes > SHARD_BYTES && !shards.last().expect("one shard").is_empty() {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        shards.last_mut().expect("one shard").push((name, tensor));
    }
    if let Some(left) = merged.keys().next() {
        return Err(Error::Weights(format!("merged tensor {left} has no place in the base checkpoint")));
    }
    if shards.len() == 1 {
        return save_safetensors(&output.join("model.safetensors"), &shards[0]);
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        save_safetensors(&output.join(&file), shard)?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    write_json(
        &output.join("model.safetensors.index.json"),
        &serde_json::json!({"metadata": {}, "weight_map": weight_map}),
    )
}

/// The original checkpoint's slow tokenizer with `<image>` and then `<pad>` added, as llava-hf's conversion
/// adds them, and the id of `<image>`.
fn extended_tokenizer(model_dir: &Path, cfg: &LlavaConfig) -> Result<(SlowTokenizer, i64)> {
    let mut tok = SlowTokenizer::from_dir(model_dir)?;
    if tok.vocab_len() != cfg.text.vocab_size {
        return Err(Error::Tokenizer(format!(
            "{}: the tokenizer has {} tokens but the model {} embeddings (vocab_size): the tokenizer belongs to another model",
            model_dir.join("tokenizer.model").display(),
            tok.vocab_len(),
            cfg.text.vocab_size
        )));
    }
    tok.add_special_tokens(&["<image>", "<pad>"]);
    let image_id = tok.vocab_id("<image>").expect("added");
    Ok((tok, i64::from(image_id)))
}

/// Grows the input embeddings and the output layer from `old` to `new` rows. The conversion script samples
/// each new row of both from N(μ, 1e-5·Σ), μ and Σ the mean and covariance of the input embeddings' rows; stic
/// takes μ itself, the distribution's mean, so that the output does not depend on a random draw (the sampled
/// rows differ from μ by about 0.3 % of the rows' spread).
fn grow_vocabulary(
    ckpt: &Checkpoint,
    merged: &mut HashMap<String, Tensor>,
    old: i64,
    new: i64,
    stored: Kind,
) -> Result<()> {
    let load = |name: &str| -> Result<Option<Tensor>> { ckpt.load(name, Kind::Float, Device::Cpu) };
    let embed = load(EMBED)?.ok_or_else(|| Error::Weights(format!("missing tensor {EMBED}")))?;
    let mean = embed.mean_dim(0, true, Kind::Float);
    for name in [EMBED, LM_HEAD] {
        let Some(weight) = load(name)? else { continue };
        if weight.size()[0] != old {
            return Err(Error::Weights(format!(
                "{name} has {} rows, the config's vocab_size is {old}",
                weight.size()[0]
            )));
        }
        let rows = mean.expand([new - old, weight.size()[1]], false);
        merged.insert(name.to_string(), Tensor::cat(&[weight, rows], 0).to_kind(stored));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::llava_hf_image;
    use crate::error::Error;
    use crate::image::{AspectMode, ImageConfig, PatchMerge};
    use std::path::Path;

    fn image(aspect_mode: AspectMode, patch_merge: PatchMerge) -> ImageConfig {
        ImageConfig { aspect_mode, patch_merge, ..ImageConfig::default() }
    }

    #[test]
    fn pad_mode_becomes_llava_one_five_and_anyres_stays_llava_next() {
        let config = Path::new("config.json");
        for merge in [PatchMerge::Flat, PatchMerge::SpatialUnpad] {
            let hf = llava_hf_image(&image(AspectMode::Pad, merge), config).expect("pad mode converts");
            assert_eq!(hf, image(AspectMode::CenterCrop, PatchMerge::Flat));
        }
        let next = image(AspectMode::Anyres, PatchMerge::SpatialUnpad);
        assert_eq!(llava_hf_image(&next, config).expect("anyres converts"), next);
        let refused = llava_hf_image(&image(AspectMode::Anyres, PatchMerge::Flat), config);
        assert!(matches!(refused, Err(Error::Input(why)) if why.contains("anyres with the flat merge")));
    }
}
