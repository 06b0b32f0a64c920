use std::path::PathBuf;

/// Errors of the library. Everything except `Torch` is caused by the caller's input or files.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("{0}")]
    Input(String),
    #[error("{path}: {error}")]
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

pub fn input_error<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Input(msg.into()))
}

/// Reads a JSON file into `T`, naming the file in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: invalid JSON: {e}", path.display())))
}
