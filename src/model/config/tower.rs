//! The CLIP tower an original LLaVA checkpoint names in `mm_vision_tower`, found as LLaVA's `CLIPVisionTower` finds
//! it (`from_pretrained`: a local folder, or a hub id in the local Hugging Face cache).
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::read_json;

use super::VisionConfig;

/// Where the CLIP tower of an original-layout checkpoint is.
#[derive(Debug, Clone, PartialEq)]
pub enum VisionTower {
    /// A folder with the tower's `config.json`, `preprocessor_config.json` and weights.
    Folder(PathBuf),
    /// A hub id that is neither a folder nor in the local cache: usable only when the checkpoint holds the tower.
    NotFound(String),
}

/// The snapshot of `repo_id` in a hub cache: the one `refs/main` names, else any with a config.json.
fn cached_snapshot(cache: &Path, repo_id: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if let Ok(main) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let snapshot = snapshots.join(main.trim());
        if snapshot.join("config.json").is_file() {
            return Some(snapshot);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    found.sort();
    found.pop()
}

impl VisionTower {
    /// Finds the tower `mm_vision_tower` names: a local folder, or a hub id in the Hugging Face cache that `--model`
    /// reads too ([`crate::hub_cache::cache_dir`]).
    pub fn locate(name: &str) -> Self {
        let local = Path::new(name);
        if local.is_dir() {
            return VisionTower::Folder(local.to_path_buf());
        }
        let cache = crate::hub_cache::cache_dir(|var| std::env::var(var).ok());
        match cached_snapshot(&cache, name) {
            Some(snapshot) => VisionTower::Folder(snapshot),
            None => VisionTower::NotFound(name.to_string()),
        }
    }

    /// What to do when the checkpoint holds no tower tensors and the tower was not found.
    pub fn not_found_advice(name: &str, config: &Path) -> String {
        format!(
            "the checkpoint holds no vision tower tensors (as LLaVA-v1.5 ships) and its mm_vision_tower '{name}' is \
             neither a folder nor in the Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub): \
             fetch it with `huggingface-cli download {name}`, or put the path of a local folder with the tower in \
             mm_vision_tower of {}",
            config.display()
        )
    }
}

/// The geometry of a CLIP tower folder: `vision_config` of a `CLIPModel` config, or a `CLIPVisionConfig`.
pub fn read_tower_config(dir: &Path) -> Result<VisionConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(Error::Config(format!(
            "{} not found: the vision tower folder named by mm_vision_tower must hold the tower's config.json, \
             preprocessor_config.json and weights (as `huggingface-cli download` fetches them)",
            path.display()
        )));
    }
    let raw: serde_json::Value = read_json(&path)?;
    let section = raw.get("vision_config").cloned().unwrap_or(raw);
    serde_json::from_value(section).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Refuses a tower config whose geometry is not that of the tower's tensors, naming the first field that differs.
pub fn check_tower_agrees(config: &VisionConfig, tensors: &VisionConfig, tower: &Path) -> Result<()> {
    let fields = [
        ("hidden_size", config.hidden_size, tensors.hidden_size),
        ("intermediate_size", config.intermediate_size, tensors.intermediate_size),
        ("num_hidden_layers", config.num_hidden_layers, tensors.num_hidden_layers),
        ("patch_size", config.patch_size, tensors.patch_size),
        ("image_size", config.image_size, tensors.image_size),
    ];
    match fields.iter().find(|(_, said, found)| said != found) {
        None => Ok(()),
        Some((field, said, found)) => Err(Error::Config(format!(
            "{}: {field} is {said} but the vision tower's tensors have {found}: the folder mm_vision_tower names is not \
             the tower of this checkpoint (fix the folder, or put the right one in mm_vision_tower)",
            tower.join("config.json").display()
        ))),
    }
}
