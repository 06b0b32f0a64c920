use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Folder to write the model to.
    #[arg(long)]
    output: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    stic::model::tiny::write_tiny_model(&args.output, args.seed)?;
    eprintln!("wrote a random tiny LLaVA-NeXT-Mistral model to {}", args.output.display());
    Ok(())
}
