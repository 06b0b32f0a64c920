//! What produced a score, written into `summary.json` as lmms-eval writes its run configuration into its results:
//! the stic build, the model and adapter, template, profile, generation settings and judge.
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::eval::benchmarks::MmBenchOptions;

#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub stic: Build,
    pub benchmark: BenchmarkRun,
    /// sha256 of the prediction file that was scored.
    pub predictions_sha256: String,
    pub model: Option<Weights>,
    pub adapter: Option<Weights>,
    pub template: Option<&'static str>,
    /// The `--profile` label (`stic reproduce` passes its profile).
    pub profile: Option<String>,
    pub generation: Option<Generation>,
    pub judge: Option<JudgeUsed>,
}

/// The binary: its version and the commit it was built from (`STIC_GIT_COMMIT` at build time, which `make build`
/// sets; `None` for a build outside a git checkout or by plain `cargo build`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Build {
    pub version: &'static str,
    pub git_commit: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchmarkRun {
    pub name: &'static str,
    pub data: String,
    pub circular: bool,
    pub with_text_only: bool,
    /// Written only when not the default, so that output folders of earlier runs resume.
    #[serde(skip_serializing_if = "MmBenchOptions::is_default")]
    pub mmbench_options: MmBenchOptions,
}

/// A model or adapter folder and the sha256 of its config file.
#[derive(Debug, Clone, Serialize)]
pub struct Weights {
    pub path: String,
    pub config: &'static str,
    pub config_sha256: String,
}

impl Weights {
    /// `config` is the folder's config file: `config.json` for a model, `adapter_config.json` for an adapter.
    pub fn of(dir: &Path, config: &'static str) -> Result<Self> {
        let path = dir.join(config);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Weights { path: dir.display().to_string(), config, config_sha256: sha256_hex(&bytes) })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The dtype the model ran in.
    pub dtype: String,
    pub max_new_tokens: usize,
    /// Greedy decoding, as every official eval script (`--temperature 0`).
    pub temperature: f64,
    pub dar: Option<DarSettings>,
    /// sha256 of the `--descriptions` file the answers' DaR descriptions came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub descriptions_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DarSettings {
    pub description_prompt: String,
    pub description_max_new_tokens: usize,
    /// The description was written without the image (`--dar-image-blind`).
    pub image_blind: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct JudgeUsed {
    pub model: String,
    pub url: String,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// What identifies the weights in a folder without reading them: its canonical path and the name, size and
/// modification time of each of its `.json` and `.safetensors` files. A copy elsewhere, or weights rewritten in
/// place, give another fingerprint.
pub fn folder_fingerprint(dir: &Path) -> Result<String> {
    let canonical = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&canonical).map_err(|e| Error::io(&canonical, e))? {
        let entry = entry.map_err(|e| Error::io(&canonical, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.ends_with(".json") || name.ends_with(".safetensors")) {
            continue;
        }
        let meta = entry.metadata().map_err(|e| Error::io(entry.path(), e))?;
        let modified =
            meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        files.push(format!("{name}\t{}\t{modified}", meta.len()));
    }
    files.sort();
    Ok(sha256_hex(format!("{}\n{}", canonical.display(), files.join("\n")).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_fingerprint_changes_with_the_weights_and_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        std::fs::write(model.join("model.safetensors"), "weights").unwrap();
        std::fs::write(model.join("notes.txt"), "ignored").unwrap();
        let first = folder_fingerprint(&model).unwrap();
        std::fs::write(model.join("notes.txt"), "still ignored").unwrap();
        assert_eq!(folder_fingerprint(&model).unwrap(), first);
        std::fs::write(model.join("model.safetensors"), "other weights").unwrap();
        let rewritten = folder_fingerprint(&model).unwrap();
        assert_ne!(rewritten, first);
        let moved = dir.path().join("moved");
        std::fs::rename(&model, &moved).unwrap();
        assert_ne!(folder_fingerprint(&moved).unwrap(), rewritten);
        assert_eq!(folder_fingerprint(&moved.join("..").join("moved")).unwrap(), folder_fingerprint(&moved).unwrap());
    }

    #[test]
    fn weights_name_their_config_hash() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("adapter_config.json"), "{\"r\": 128}").unwrap();
        let weights = Weights::of(dir.path(), "adapter_config.json").unwrap();
        assert_eq!(weights.config_sha256, sha256_hex(b"{\"r\": 128}"));
        assert!(Weights::of(dir.path(), "config.json").is_err());
    }
}
