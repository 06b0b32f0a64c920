//! File writes that are all-or-nothing.
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames it over `path`. On any failure (a
/// full disk, a read-only folder) the temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Creates a folder (and its parents), naming it in the error.
pub fn create_dir(path: &Path) -> Result<()> {
    if let Some(file) = path.ancestors().find(|p| p.is_file()) {
        return Err(Error::Input(format!("cannot create folder {}: {} is a file", path.display(), file.display())));
    }
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Creates the folder a file will be written to.
pub fn create_parent(file: &Path) -> Result<()> {
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => create_dir(parent),
        None => Ok(()),
    }
}
