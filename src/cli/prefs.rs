use std::path::PathBuf;

use super::job_args::JobArgs;
use super::model_args::ModelArgs;
use stic::method::prefs::{merge_job_shards, run_prefs, MergeOptions, PrefsOptions};

// `stic eval` reaches these here until it takes them from their new places.

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder of unlabeled images.
    #[arg(long)]
    image_dir: PathBuf,
    /// JSON list of image names in --image-dir (e.g. third_party/stic/6k_coco_names.json); default: every image there.
    #[arg(long)]
    images: Option<PathBuf>,
    /// JSONL output; a rerun continues it.
    #[arg(long)]
    output: PathBuf,
    /// `flag-only` marks the corrupted-image half but generates it from the clean image, as the official
    /// `generate_pref.py` does.
    #[arg(long, value_enum, default_value_t = CorruptionMode::Apply)]
    corruption: CorruptionMode,
    /// Resampling of the 20-px downscale: bilinear is torchvision's `Resize` on PIL images.
    #[arg(long, value_enum, default_value_t = ResizeFilter::Bilinear)]
    resize_filter: ResizeFilter,
    /// One pair per entry of --images, a name listed twice included (records keyed by list position, `index`),
    /// as the official `generate_pref.py` does: 6,275 pairs from 6k_coco_names.json, not 6,099.
    #[arg(long)]
    keep_duplicates: bool,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptionMode {
    Apply,
    FlagOnly,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ResizeFilter {
    Bilinear,
    Bicubic,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    run_prefs(&PrefsOptions {
        model: args.model.spec(args.job.sampling.seed),
        image_dir: args.image_dir,
        images: args.images,
        output: args.output,
        apply_corruption: args.corruption == CorruptionMode::Apply,
        resize_filter: match args.resize_filter {
            ResizeFilter::Bilinear => stic::image::Filter::Bilinear,
            ResizeFilter::Bicubic => stic::image::Filter::Bicubic,
        },
        keep_duplicates: args.keep_duplicates,
        job: args.job.options(),
    })?;
    Ok(())
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// Shard outputs to join.
    #[arg(long, required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    /// The joined JSONL.
    #[arg(long)]
    output: PathBuf,
    /// The image folder of the run (its images give the order), or use --images.
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// The JSON list of image names of the run (its order is the output's).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Merge `stic describe` shards instead (keyed and ordered by the entry ids of this LLaVA JSON).
    #[arg(long, conflicts_with_all = ["image_dir", "images"])]
    data: Option<PathBuf>,
}

pub fn run_merge(args: MergeArgs) -> anyhow::Result<()> {
    let opts = MergeOptions {
        inputs: args.inputs,
        output: args.output,
        image_dir: args.image_dir,
        images: args.images,
        data: args.data,
    };
    let n = merge_job_shards(&opts)?;
    eprintln!("{}: {n} records from {} shards", opts.output.display(), opts.inputs.len());
    Ok(())
}
