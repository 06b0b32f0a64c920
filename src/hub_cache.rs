//! Models named by their Hugging Face hub id (`owner/name`, `owner/name@revision`), found in the local hub
//! cache that `huggingface-cli download` / `hf download` fill, without the network.
//!
//! The cache layout (huggingface_hub's): `models--owner--name/refs/<ref>` holds the commit hash a branch or tag
//! points at, `models--owner--name/snapshots/<commit>/` the files (usually symlinks into `blobs/`).
use std::path::{Path, PathBuf};

#[derive(thiserror::Error, Debug, PartialEq)]
pub enum HubCacheError {
    #[error(
        "'{id}' is no local folder, and the Hugging Face cache {cache} does not hold it (looked for {folder}). \
         Download it with `huggingface-cli download {id}{revision_flag}` (or `hf download {id}{revision_flag}`), \
         or point HF_HUB_CACHE (or HF_HOME) at the cache that holds it, or give the model's folder",
        cache = cache.display(),
        folder = folder.display(),
        revision_flag = revision.as_deref().map(|r| format!(" --revision {r}")).unwrap_or_default()
    )]
    NotCached { id: String, revision: Option<String>, cache: PathBuf, folder: PathBuf },
    #[error(
        "the Hugging Face cache holds {id} ({folder}) but not its revision '{revision}' (cached: {known}). \
         Download it with `huggingface-cli download {id} --revision {revision}` (or `hf download {id} --revision {revision}`)",
        folder = folder.display(),
        known = if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )]
    NoRevision { id: String, revision: String, folder: PathBuf, known: Vec<String> },
}

/// A hub repository id with an optional revision: `owner/name` or `owner/name@revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId<'a> {
    pub owner: &'a str,
    pub name: &'a str,
    pub revision: Option<&'a str>,
}

impl<'a> HubId<'a> {
    /// Reads `text` as a hub id: two parts of letters, digits, `-`, `_` and `.` (not starting with `.`) around
    /// one `/`. Anything else (`./model`, `/abs/path`, `a/b/c`) is no hub id.
    pub fn parse(text: &'a str) -> Option<Self> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, revision)) if !revision.is_empty() => (repo, Some(revision)),
            Some(_) => return None,
            None => (text, None),
        };
        let (owner, name) = repo.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        (part(owner) && part(name)).then_some(HubId { owner, name, revision })
    }

    fn repo(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

/// The hub cache folder as huggingface_hub finds it: `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else
/// `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir(env: impl Fn(&str) -> Option<String>) -> PathBuf {
    let set = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("HF_HUB_CACHE").or_else(|| set("HUGGINGFACE_HUB_CACHE")) {
        return dir;
    }
    let home = set("HF_HOME").unwrap_or_else(|| {
        let cache = set("XDG_CACHE_HOME").unwrap_or_else(|| set("HOME").unwrap_or_default().join(".cache"));
        cache.join("huggingface")
    });
    home.join("hub")
}

/// The snapshot folder of `id` in `cache`: the commit that `refs/<revision>` (default `main`) names, or the
/// snapshot of that commit hash.
pub fn snapshot(id: &HubId, cache: &Path) -> Result<PathBuf, HubCacheError> {
    let folder = cache.join(format!("models--{}--{}", id.owner, id.name));
    if !folder.join("snapshots").is_dir() {
        return Err(HubCacheError::NotCached {
            id: id.repo(),
            revision: id.revision.map(str::to_string),
            cache: cache.to_owned(),
            folder,
        });
    }
    let revision = id.revision.unwrap_or("main");
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let dir = folder.join("snapshots").join(&commit);
    if !commit.is_empty() && !commit.contains(['/', '\\']) && dir.is_dir() {
        return Ok(dir);
    }
    let names = |sub: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(folder.join(sub))
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    let mut known = names("refs");
    known.extend(names("snapshots"));
    Err(HubCacheError::NoRevision { id: id.repo(), revision: revision.to_string(), folder, known })
}

/// A `--model`/`--adapter` value: an existing path as it is, a hub id (that is no local path) as its cached
/// snapshot, anything else as it is (the loader then says what is missing).
pub fn resolve(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<PathBuf, HubCacheError> {
    let path = PathBuf::from(text);
    match HubId::parse(text) {
        Some(id) if !path.exists() => snapshot(&id, &cache_dir(env)),
        _ => Ok(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths() {
        assert_eq!(
            HubId::parse("llava-hf/llava-v1.6-mistral-7b-hf"),
            Some(HubId { owner: "llava-hf", name: "llava-v1.6-mistral-7b-hf", revision: None })
        );
        assert_eq!(HubId::parse("a/b@v1.0").and_then(|id| id.revision), Some("v1.0"));
        for not_an_id in ["model", "./model", "/abs/model", "a/b/c", "../b", "a/", "a/b@", "a b/c"] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn cache_dir_follows_huggingface_hub() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        assert_eq!(cache_dir(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/u")])), PathBuf::from("/c"));
        assert_eq!(cache_dir(env(&[("HF_HOME", "/h"), ("HOME", "/u")])), PathBuf::from("/h/hub"));
        assert_eq!(cache_dir(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/u")])), PathBuf::from("/x/huggingface/hub"));
        assert_eq!(cache_dir(env(&[("HOME", "/u")])), PathBuf::from("/u/.cache/huggingface/hub"));
    }

    #[test]
    fn refs_commits_and_missing_revisions() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--owner--tiny");
        for commit in ["abc123", "def456"] {
            std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        let at = |text: &str| snapshot(&HubId::parse(text).unwrap(), cache.path());
        assert_eq!(at("owner/tiny").unwrap(), repo.join("snapshots/abc123"));
        assert_eq!(at("owner/tiny@def456").unwrap(), repo.join("snapshots/def456"));
        let missing = at("owner/tiny@v2").unwrap_err().to_string();
        assert!(missing.contains("revision 'v2'") && missing.contains("main, abc123, def456"), "{missing}");
        let absent = at("owner/other").unwrap_err().to_string();
        assert!(
            absent.contains("huggingface-cli download owner/other`") && absent.contains("HF_HUB_CACHE"),
            "{absent}"
        );
    }
}
