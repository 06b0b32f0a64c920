//! `stic merge`: folds a LoRA adapter (and a trained projector) into the base weights and writes an ordinary
//! llava-hf checkpoint that transformers loads without PEFT.
use std::path::Path;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::lora::Adapter;
use crate::model::tiny::{write_json, write_model_files};
use crate::model::weights::{save_safetensors, Checkpoint};
use crate::model::{LlavaConfig, LlavaNext};

/// Shards of at most this many bytes, like transformers' default `max_shard_size`.
const SHARD_BYTES: usize = 5 << 30;

pub fn merge_adapter(model_dir: &Path, adapter_dir: &Path, output: &Path) -> Result<()> {
    if output.exists() && std::fs::read_dir(output).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::Input(format!("{} exists and is not empty: choose a new --output folder", output.display())));
    }
    let ckpt = Checkpoint::open_dir(model_dir)?;
    let stored = ckpt.kind_of("language_model.model.embed_tokens.weight").unwrap_or(Kind::Float);
    let mut model = LlavaNext::load(model_dir, stored, Device::Cpu)?;
    Adapter::load(&mut model, adapter_dir, false)?;
    let mut merged: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
    for (path, linear) in model.language_model.decoder_linears_mut() {
        if let Some(lora) = &linear.lora {
            let w = (linear.weight.to_kind(Kind::Float) + lora.delta_weight()).to_kind(stored);
            merged.insert(format!("{path}.weight"), w);
        }
    }
    if model.original_projector.is_some() {
        for (path, linear) in model.multi_modal_projector.linears_mut() {
            merged.insert(format!("{path}.weight"), linear.weight.to_kind(stored));
            if let Some(b) = &linear.bias {
                merged.insert(format!("{path}.bias"), b.to_kind(stored));
            }
        }
    }
    let cfg: LlavaConfig = model.cfg.clone();
    drop(model);
    // All or nothing: a full disk leaves no output folder without (all) weights.
    crate::fsutil::write_dir_atomic(output, |staging| write_merged(staging, &cfg, &ckpt, merged, stored))
}

/// Writes the merged checkpoint: the base tensors of `ckpt`, with those of `merged` in their place.
fn write_merged(output: &Path, cfg: &LlavaConfig, ckpt: &Checkpoint, mut merged: std::collections::HashMap<String, Tensor>, stored: Kind) -> Result<()> {
    write_model_files(output, cfg)?;
    let mut names: Vec<String> = ckpt.names().cloned().collect();
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
    write_json(&output.join("model.safetensors.index.json"), &serde_json::json!({"metadata": {}, "weight_map": weight_map}))
}
