use std::path::PathBuf;

use super::job_args::JobArgs;
use super::model_args::ModelArgs;
use stic::method::describe::{run_describe, DescribeOptions};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Instruction data in LLaVA format (`[{id, image, conversations}]`).
    #[arg(long)]
    data: PathBuf,
    /// Folder of the images the entries name.
    #[arg(long)]
    image_dir: PathBuf,
    /// JSONL of `{id, image, prompt, description}`; a rerun continues it.
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    job: JobArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    run_describe(&DescribeOptions {
        model: args.model.spec(args.job.sampling.seed),
        data: args.data,
        image_dir: args.image_dir,
        output: args.output,
        job: args.job.options(),
    })?;
    Ok(())
}
