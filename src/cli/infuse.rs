use std::path::PathBuf;

use stic::method::infuse::infuse_into;

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
    let report = infuse_into(&args.data, &args.descriptions, &args.output)?;
    eprintln!(
        "{}: {} entries infused, {} without an image left as they were, {} without a description{}",
        args.output.display(),
        report.infused,
        report.without_image,
        report.missing_description.len(),
        if report.missing_description.is_empty() {
            String::new()
        } else {
            format!(": {}", report.missing_description.join(", "))
        }
    );
    Ok(())
}
