use std::path::PathBuf;

use stic::stic::infuse::{infuse_files, save_instruction_data};

#[derive(clap::Args)]
pub struct Args {
    /// Instruction data in LLaVA format.
    #[arg(long)]
    data: PathBuf,
    /// `stic describe` output.
    #[arg(long)]
    descriptions: PathBuf,
    /// The infused instruction data (LLaVA format).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    stic::fsutil::check_output("--output", &args.output, &[("--data", &args.data), ("--descriptions", &args.descriptions)])?;
    let (entries, report) = infuse_files(&args.data, &args.descriptions)?;
    stic::fsutil::create_parent(&args.output)?;
    save_instruction_data(&args.output, &entries)?;
    eprintln!(
        "{}: {} entries infused, {} without an image left as they were, {} without a description{}",
        args.output.display(),
        report.infused,
        report.without_image,
        report.missing_description.len(),
        if report.missing_description.is_empty() { String::new() } else { format!(": {}", report.missing_description.join(", ")) }
    );
    Ok(())
}
