//! What `stic reproduce` finds wrong with a profile, its inputs or an output folder.
use std::path::PathBuf;

#[derive(thiserror::Error, Debug)]
pub enum ReproduceError {
    #[error("cannot read {path}: {source}")]
    ReadConfig { path: PathBuf, source: std::io::Error },

    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },

    #[error(
        "unknown profile '{name}': {} does not exist (profiles: {}); or give a file with --config",
        path.display(),
        if known.is_empty() { "none found".to_string() } else { known.join(", ") }
    )]
    UnknownProfile { name: String, path: PathBuf, known: Vec<String> },

    #[error("--benchmarks: '{name}' is not among eval.benchmarks of {}", path.display())]
    UnknownBenchmark { name: String, path: PathBuf },

    #[error("--switches: no switch '{name}' between the two profiles (switches: {})", known.join(", "))]
    UnknownSwitch { name: String, known: Vec<String> },

    #[error("--until: no step '{name}' (steps: {})", steps.join(", "))]
    UnknownStep { name: String, steps: Vec<String> },

    #[error("stic reproduce cannot start; fetch or fix these first:\n{}", problems.join("\n"))]
    NotReady { problems: Vec<String> },

    #[error(
        "step {step} was done with another command line than this profile gives now ({}); delete {} to redo it \
         (and what depends on it), or restore the settings it was run with",
        marker.display(), output.display()
    )]
    StepChanged { step: String, marker: PathBuf, output: PathBuf },

    #[error("step {step} failed ({status}); its output is in {}: fix the cause and rerun stic reproduce to continue", output.display())]
    StepFailed { step: String, status: String, output: PathBuf },

    #[error(
        "--nproc-per-node {ranks} runs the data-parallel steps under torchrun, which is not on PATH: install PyTorch \
         (`pip install torch` brings torchrun) or give its path with --torchrun PATH"
    )]
    TorchrunNotFound { ranks: usize },

    #[error("--torchrun {}: no such file", path.display())]
    TorchrunMissing { path: PathBuf },

    #[error("cannot start step {step}: {source}")]
    Spawn { step: String, source: std::io::Error },

    #[error("cannot draw the chart {}: {reason}", path.display())]
    Chart { path: PathBuf, reason: String },
}
