//! `stic reproduce`: the STIC paper end to end from one profile (`configs/<profile>/reproduce.yaml`) — stage-1
//! preferences, DPO, the stage-2 subset, descriptions, infusion, SFT, then every benchmark for the original model
//! and for STIC, each with and without describe-and-respond, and a report beside the paper's numbers.
//!
//! Every step is a run of this same binary's subcommands (or, for the subset and the report, a function here),
//! so the pipeline needs nothing else at run time. A finished step leaves a marker with its command line: a rerun
//! skips it, a killed step is rerun and continues where its command left off (the generation jobs and evaluation
//! resume their JSONL outputs, training resumes from its latest checkpoint).
pub mod config;
pub mod report;
pub mod runner;
pub mod steps;

use std::path::PathBuf;

pub use config::{Profile, ReproduceConfig};
pub use runner::run_steps;
pub use steps::{plan, Plan, Step};

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

    #[error("cannot start step {step}: {source}")]
    Spawn { step: String, source: std::io::Error },

    #[error("cannot draw the chart {}: {reason}", path.display())]
    Chart { path: PathBuf, reason: String },
}
