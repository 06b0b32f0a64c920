use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Base model folder.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// New folder for the merged llava-hf checkpoint (config, tokenizer, safetensors).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    stic::fsutil::check_output("--output", &args.output, &[("--model", &args.model), ("--adapter", &args.adapter)])?;
    stic::merge::merge_adapter(&args.model, &args.adapter, &args.output)?;
    eprintln!("merged model written to {}", args.output.display());
    Ok(())
}
