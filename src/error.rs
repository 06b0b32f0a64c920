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
    #[error(transparent)]
    Pickle(#[from] crate::model::pickle::PickleError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Job(#[from] crate::jobs::JobError),
    #[error(transparent)]
    Method(#[from] crate::method::MethodError),
    #[error(transparent)]
    Reproduce(#[from] crate::reproduce::error::ReproduceError),
    #[error(transparent)]
    EvalData(#[from] crate::eval::benchmarks::EvalDataError),
    #[error(transparent)]
    Score(#[from] crate::eval::benchmarks::ScoreError),
    #[error("training stopped: {0}")]
    Training(String),
    /// A distributed run (torchrun) could not form its group, or lost a rank.
    #[error("distributed run: {0}")]
    Distributed(String),
    /// An allocation failed on the CPU or the GPU; `advice` names the flags that lower the memory a run needs.
    #[error("out of memory: {what}; {advice}")]
    OutOfMemory { what: String, advice: String },
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

/// The phrases of libtorch's allocation failures (CUDA's caching allocator, the CPU allocator, MPS and others).
const OUT_OF_MEMORY: [&str; 3] = ["out of memory", "can't allocate memory", "not enough memory"];

/// The failed allocation a libtorch message reports, from the phrase to the end of its line (without the
/// C++ backtrace that follows), or None when the message is about something else.
pub fn out_of_memory_cause(message: &str) -> Option<String> {
    let lower = message.to_ascii_lowercase();
    let phrase_at = OUT_OF_MEMORY.iter().filter_map(|phrase| lower.find(phrase)).min()?;
    // The allocator's name comes just before its phrase ("DefaultCPUAllocator: can't allocate memory").
    let line_start = message[..phrase_at].rfind(['\n', '"', '.', ']']).map_or(0, |at| at + 1);
    let rest = &message[line_start..];
    let end = [rest.find('\n'), rest.find("\\n"), rest.find("\")")].into_iter().flatten().min().unwrap_or(rest.len());
    Some(rest[..end].trim().to_string())
}

pub fn input_error<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Input(msg.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_told_apart_and_cut_to_its_line() {
        let cpu = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at alloc_cpu.cpp:127] err == 0. \
                   DefaultCPUAllocator: can't allocate memory: you tried to allocate 10240640 bytes. Error code 12 \
                   (Cannot allocate memory)\\nframe #0: c10::ThrowEnforceNotMet\")";
        assert_eq!(
            out_of_memory_cause(cpu).unwrap(),
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 10240640 bytes. Error code 12 \
             (Cannot allocate memory)"
        );
        let cuda = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 139.8 GiB\nframe #0";
        assert_eq!(
            out_of_memory_cause(cuda).unwrap(),
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 139.8 GiB"
        );
        assert_eq!(out_of_memory_cause("CUDA error: out of memory").unwrap(), "CUDA error: out of memory");
        assert!(out_of_memory_cause("shape '[2, 3]' is invalid for input of size 5").is_none());
    }

    #[test]
    fn a_full_or_read_only_disk_says_what_to_do() {
        let full = Error::io("/data/out.jsonl", std::io::Error::from(std::io::ErrorKind::StorageFull)).to_string();
        assert!(full.starts_with("/data/out.jsonl: ") && full.contains("free space on that disk"), "{full}");
        let read_only = Error::io("/ro/x", std::io::Error::from_raw_os_error(libc::EROFS)).to_string();
        assert!(
            read_only.contains("Read-only file system (os error 30); that file system is mounted read-only"),
            "{read_only}"
        );
        let missing = Error::io("/x", std::io::Error::from(std::io::ErrorKind::NotFound)).to_string();
        assert_eq!(missing, "/x: entity not found");
    }
}
