use std::path::PathBuf;

/// Errors of the library. Everything except `Torch` is caused by the caller's input or files.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("{0}")]
    Input(String),
    #[error("{path}: {error}{}", io_advice(error))]
    Io { path: PathBuf, error: std::io::Error },
    #[error("model config: {0}")]
    Config(String),
    #[error("model weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Pipeline(#[from] crate::stic::PipelineError),
    #[error(transparent)]
    Reproduce(#[from] crate::stic::reproduce::ReproduceError),
    #[error(transparent)]
    EvalData(#[from] crate::eval::benchmarks::EvalDataError),
    #[error(transparent)]
    Score(#[from] crate::eval::benchmarks::ScoreError),
    #[error("training stopped: {0}")]
    Training(String),
    /// A distributed run (torchrun) could not form its group, or lost a rank.
    #[error("distributed run: {0}")]
    Distributed(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }

    /// True when the error comes from the caller's input rather than from libtorch itself.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::Torch(_))
    }
}

/// What to do about the I/O errors that come from where the output goes rather than from the file itself.
pub fn io_advice(error: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
            "; free space on that disk, or write the output to another one, and run the command again (prefs, \
             describe and eval continue where they stopped, training with --resume)"
        }
        ErrorKind::ReadOnlyFilesystem => {
            "; that file system is mounted read-only: write the output to a writable folder (or remount it read-write)"
        }
        _ => "",
    }
}

pub fn input_error<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Input(msg.into()))
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
    fn a_full_or_read_only_disk_says_what_to_do() {
        let full = Error::io("/data/out.jsonl", std::io::Error::from(std::io::ErrorKind::StorageFull)).to_string();
        assert!(full.starts_with("/data/out.jsonl: ") && full.contains("free space on that disk"), "{full}");
        let read_only = Error::io("/ro/x", std::io::Error::from_raw_os_error(libc::EROFS)).to_string();
        assert!(read_only.contains("Read-only file system (os error 30); that file system is mounted read-only"), "{read_only}");
        let missing = Error::io("/x", std::io::Error::from(std::io::ErrorKind::NotFound)).to_string();
        assert_eq!(missing, "/x: entity not found");
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
