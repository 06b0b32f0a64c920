use std::path::PathBuf;

use stic::train::data::prefs_to_sft;

#[derive(clap::Args)]
pub struct Args {
    /// `stic prefs` output (JSONL) or a JSON list of preference pairs.
    #[arg(long)]
    prefs: PathBuf,
    /// The conversations for `stic train-sft --data` (a JSON list in LLaVA format).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let count = prefs_to_sft(&args.prefs, &args.output)?;
    eprintln!("{}: {count} conversations (each pair's prompt and chosen description)", args.output.display());
    Ok(())
}
