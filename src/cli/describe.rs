use std::path::PathBuf;

use super::model_args::ModelArgs;
use super::prefs::{finish_job, JobArgs};
use stic::stic::describe::DescribeTask;
use stic::stic::infuse::load_instruction_data;
use stic::stic::job::run_job;
use stic::stic::prefs::SticPrompts;
use stic::stic::sharding::JobOutput;

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
    args.model.check_output("--output", &args.output, &[("--data", &args.data)])?;
    let entries = load_instruction_data(&args.data)?;
    stic::stic::infuse::validate_image_ids(&args.data, &entries)?;
    stic::fsutil::create_parent(&args.output)?;
    let prompts = SticPrompts::shipped();
    let sharding = args.job.sharding()?;
    let opts = args.job.options(&args.output, "id", "descriptions", &prompts, &sharding, &args.model, "describe");
    let session = args.model.load_for(&sharding)?;
    let task = DescribeTask {
        description_prompts: prompts.description_prompts.clone(),
        image_dir: &args.image_dir,
        seed: args.job.seed,
        max_pixels: session.model.cfg.image.max_pixels,
    };
    let with_images: Vec<_> = entries.into_iter().filter(|e| e.image.is_some()).collect();
    let started = std::time::Instant::now();
    let summary = run_job(&session, &task, &with_images, &opts)?;
    finish_job(&summary, &opts.output, started, &args.job.summary)?;
    let ids: Vec<String> = with_images.iter().map(|e| e.id_text()).collect();
    sharding.finish(&[JobOutput { path: &args.output, key_field: "id", keys: &ids }])?;
    Ok(())
}
