//! The JSON summary a job ends with: always written to a file beside its output, printed on stdout with --json.
use std::path::Path;

#[derive(clap::Args, Debug, Clone)]
pub struct SummaryArgs {
    /// Also print the run's JSON summary on stdout (it is written to a file beside the output either way).
    #[arg(long)]
    pub json: bool,
}

impl SummaryArgs {
    /// Writes `summary` to `path` (atomically) and prints it with --json.
    pub fn emit(&self, path: &Path, summary: &serde_json::Value) -> stic::Result<()> {
        stic::summary::write_summary(path, summary, self.json)
    }
}
