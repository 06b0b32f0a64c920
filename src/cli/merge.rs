use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Base model folder, or its hub id in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_args::hub_path)]
    model: PathBuf,
    /// PEFT LoRA adapter folder, or its hub id in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_args::hub_path)]
    adapter: PathBuf,
    /// New folder for the merged llava-hf checkpoint (config, tokenizer, safetensors).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    stic::fsutil::check_output("--output", &args.output, &[("--model", &args.model), ("--adapter", &args.adapter)])?;
    stic::adapter::merge::merge_adapter(&args.model, &args.adapter, &args.output)?;
    eprintln!("merged model written to {}", args.output.display());
    Ok(())
}
