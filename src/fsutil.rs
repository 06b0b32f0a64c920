//! File writes that are all-or-nothing, outputs that must not overwrite inputs, output locks, and the cleanup of
//! what a failed command created, and the readers of text and JSON files.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

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

/// Writes a folder of files all or nothing: `write` fills a new temporary folder beside `dir`, which then
/// becomes `dir` (when `dir` is absent or empty) or whose files replace those of the same names in `dir`. On
/// failure the temporary folder is removed and `dir` is left as it was.
pub fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    create_parent(dir)?;
    let staging = temp_path(dir);
    let _ = std::fs::remove_dir_all(&staging);
    let result = create_dir(&staging).and_then(|()| write(&staging)).and_then(|()| publish(&staging, dir));
    let _ = std::fs::remove_dir_all(&staging);
    // Name the file the caller asked for, not its temporary twin.
    result.map_err(|error| match error {
        Error::Io { path, error } => {
            Error::Io { path: path.strip_prefix(&staging).map_or(path.clone(), |rest| dir.join(rest)), error }
        }
        other => other,
    })
}

fn publish(staging: &Path, dir: &Path) -> Result<()> {
    if std::fs::rename(staging, dir).is_ok() {
        return Ok(());
    }
    create_dir(dir)?;
    for entry in std::fs::read_dir(staging).map_err(|e| Error::io(staging, e))? {
        let name = entry.map_err(|e| Error::io(staging, e))?.file_name();
        std::fs::rename(staging.join(&name), dir.join(&name)).map_err(|e| Error::io(dir.join(&name), e))?;
    }
    Ok(())
}

/// Folders this process created, for [`remove_created_dirs`].
static CREATED_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Creates a folder (and its parents), naming it in the error. The folders it creates are remembered, so that a
/// command that fails removes them again ([`remove_created_dirs`]).
pub fn create_dir(path: &Path) -> Result<()> {
    if let Some(file) = path.ancestors().find(|p| p.is_file()) {
        return Err(Error::Input(format!("cannot create folder {}: {} is a file", path.display(), file.display())));
    }
    let missing: Vec<PathBuf> =
        path.ancestors().take_while(|p| !p.as_os_str().is_empty() && !p.exists()).map(Path::to_path_buf).collect();
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
    CREATED_DIRS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).extend(missing.into_iter().rev());
    Ok(())
}

/// Creates the folder a file will be written to.
pub fn create_parent(file: &Path) -> Result<()> {
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => create_dir(parent),
        None => Ok(()),
    }
}

/// Removes the folders [`create_dir`] created in this process that are still empty, deepest first: a command
/// that fails before writing anything leaves no empty folders behind.
pub fn remove_created_dirs() {
    let created = std::mem::take(&mut *CREATED_DIRS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    for dir in created.iter().rev() {
        // Fails, as it should, for a folder that holds something.
        let _ = std::fs::remove_dir(dir);
    }
}

/// `path` made absolute with symbolic links and `..` resolved, also when its end does not exist yet: the
/// deepest existing ancestor is resolved and the rest appended (`..` there undoes the component before it, as
/// creating the folders would).
fn resolve(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let components: Vec<Component> = absolute.components().collect();
    for split in (1..=components.len()).rev() {
        let Ok(mut resolved) = components[..split].iter().collect::<PathBuf>().canonicalize() else { continue };
        for component in &components[split..] {
            match component {
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::CurDir => {}
                other => resolved.push(other),
            }
        }
        return resolved;
    }
    absolute
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Refuses an output that would destroy what the command reads: an output that is one of the input files
/// (also through a symbolic or hard link), or that lies in an input folder (the model, an adapter). `output`
/// may be a file or a folder to be written and need not exist yet; `inputs` are (flag, path) pairs, and inputs
/// that do not exist are left for the command to report.
pub fn check_output(flag: &str, output: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let resolved = resolve(output);
    let output_meta = std::fs::metadata(output).ok();
    for &(input_flag, input) in inputs {
        let Ok(input_meta) = std::fs::metadata(input) else { continue };
        let clash = if input_meta.is_dir() {
            let folder = resolve(input);
            let relation =
                if resolved == folder { Some("is") } else { resolved.starts_with(&folder).then_some("lies inside") };
            relation.map(|relation| {
                format!(
                    "{relation} the {input_flag} folder {}: writing there would change what it holds",
                    input.display()
                )
            })
        } else {
            (resolved == resolve(input) || output_meta.as_ref().is_some_and(|m| same_file(m, &input_meta)))
                .then(|| format!("is the {input_flag} file {}: writing it would destroy that input", input.display()))
        };
        if let Some(why) = clash {
            return Err(Error::Input(format!("{flag} {} {why}; choose another {flag}", output.display())));
        }
    }
    Ok(())
}

/// Why [`open_locked`] failed.
pub enum LockError {
    /// Another process holds the lock.
    Held,
    Io(std::io::Error),
}

/// Opens `path` with `options` and takes an exclusive lock on it without waiting. The lock is taken on the file
/// that `path` names once locked: a holder may remove the file before it lets go (an empty output, a lock
/// file), and a lock on the removed file would not exclude the next process.
pub fn open_locked(path: &Path, options: &OpenOptions) -> std::result::Result<File, LockError> {
    loop {
        let file = options.open(path).map_err(LockError::Io)?;
        file.try_lock().map_err(|error| match error {
            std::fs::TryLockError::WouldBlock => LockError::Held,
            std::fs::TryLockError::Error(e) => LockError::Io(e),
        })?;
        let locked = file.metadata().map_err(LockError::Io)?;
        if std::fs::metadata(path).is_ok_and(|named| same_file(&named, &locked)) {
            return Ok(file);
        }
    }
}

/// The file in an output folder whose lock [`FolderLock`] holds.
pub const LOCK_FILE: &str = ".stic.lock";

/// An exclusive claim on an output folder against a second writer: a lock on [`LOCK_FILE`] in it, which goes
/// (file included) when the claim is dropped.
pub struct FolderLock {
    path: PathBuf,
    _file: File,
}

impl FolderLock {
    /// Creates `folder` if needed and locks it; `flag` names it in the error when another process holds it.
    pub fn acquire(folder: &Path, flag: &str) -> Result<Self> {
        create_dir(folder)?;
        let path = folder.join(LOCK_FILE);
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        match open_locked(&path, &options) {
            Ok(file) => Ok(FolderLock { path, _file: file }),
            Err(LockError::Held) => Err(Error::Input(format!(
                "{flag} {} is being written by another run (it holds {}): wait for it to end, or choose another {flag}",
                folder.display(),
                path.display()
            ))),
            Err(LockError::Io(e)) => Err(Error::io(&path, e)),
        }
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Removed while still locked, so that no other process can have locked it in between.
        let _ = std::fs::remove_file(&self.path);
    }
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// `bytes` without a leading UTF-8 byte-order mark (which editors on Windows write, and JSON parsers refuse).
pub fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes)
}

/// Reads a UTF-8 text file, dropping a byte-order mark; bytes that are not UTF-8 are an error naming the line.
pub fn read_text(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = without_bom(&bytes);
    match std::str::from_utf8(text) {
        Ok(text) => Ok(text.to_owned()),
        Err(e) => {
            let line = text[..e.valid_up_to()].iter().filter(|&&byte| byte == b'\n').count() + 1;
            Err(Error::Input(format!("{}, line {line}: not UTF-8 ({e}); save the file as UTF-8", path.display())))
        }
    }
}

/// Reads a JSON file into `T`, naming the file in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: invalid JSON: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_that_is_an_input_or_inside_an_input_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let model = root.join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("model.safetensors"), "weights").unwrap();
        let list = root.join("list.json");
        std::fs::write(&list, "[]").unwrap();
        std::os::unix::fs::symlink(&list, root.join("link.json")).unwrap();
        std::fs::hard_link(&list, root.join("hard.json")).unwrap();
        std::os::unix::fs::symlink(&model, root.join("model-link")).unwrap();
        let inputs = [("--images", list.as_path()), ("--model", model.as_path())];
        let refused = |output: &str| check_output("--output", &root.join(output), &inputs).map_err(|e| e.to_string());

        for same in ["list.json", "link.json", "hard.json", "sub/../list.json"] {
            let error = refused(same).unwrap_err();
            assert!(
                error.contains("is the --images file") && error.ends_with("choose another --output"),
                "{same}: {error}"
            );
        }
        for inside in ["model/model.safetensors", "model-link/new/file", "model", "new/../model/x"] {
            let error = refused(inside).unwrap_err();
            assert!(error.contains("the --model folder"), "{inside}: {error}");
        }
        assert!(refused("model-link").unwrap_err().contains("is the --model folder"));
        for fine in ["out.jsonl", "new/list.json", "modelx/a", "absent/../out"] {
            refused(fine).unwrap();
        }
    }

    #[test]
    fn a_folder_written_atomically_is_all_there_or_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        write_dir_atomic(&out, |d| write_atomic(&d.join("a"), b"1")).unwrap();
        assert_eq!(std::fs::read(out.join("a")).unwrap(), b"1");
        let error = write_dir_atomic(&out, |d| {
            write_atomic(&d.join("a"), b"2")?;
            Err(Error::io(d.join("b"), std::io::Error::from(std::io::ErrorKind::StorageFull)))
        });
        let message = error.unwrap_err().to_string();
        assert!(message.starts_with(&format!("{}: ", out.join("b").display())), "{message}");
        write_dir_atomic(&out, |d| write_atomic(&d.join("b"), b"3")).unwrap();
        assert_eq!(std::fs::read(out.join("a")).unwrap(), b"1");
        assert_eq!(std::fs::read(out.join("b")).unwrap(), b"3");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["out"]);
    }

    #[test]
    fn a_locked_folder_is_refused_and_its_lock_file_goes_with_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let first = FolderLock::acquire(&out, "--output").unwrap();
        let error = FolderLock::acquire(&out, "--output").err().unwrap().to_string();
        assert!(error.contains("is being written by another run"), "{error}");
        drop(first);
        assert!(!out.join(LOCK_FILE).exists());
        drop(FolderLock::acquire(&out, "--output").unwrap());
    }

    #[test]
    fn text_files_lose_their_bom_and_bad_bytes_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.json");
        std::fs::write(&path, b"\xEF\xBB\xBF[1, 2]").unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), [1, 2]);
        std::fs::write(&path, b"[\n1,\n\"caf\xE9\"]").unwrap();
        let error = read_json::<serde_json::Value>(&path).unwrap_err().to_string();
        assert!(error.contains("data.json, line 3: not UTF-8") && error.ends_with("save the file as UTF-8"), "{error}");
    }
}
