use std::path::{Path, PathBuf};

use super::model_args::ModelArgs;
use stic::generate::SamplingConfig;
use stic::stic::job::{run_job, JobOptions, JobSummary};
use stic::stic::jsonl::{merge_shards, MissingKeys};
use stic::stic::prefs::{PrefsTask, SticPrompts};
use stic::stic::sharding::{JobOutput, Sharding};
use stic::text::Template;
use stic::{Error, Result};

/// Sampling flags of the generation jobs; unset values come from third_party/stic/prompts.json.
#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// Process only the items whose position p in the list has p % N == I (join the outputs with
    /// `stic prefs-merge`). Under torchrun each rank takes shard RANK/WORLD_SIZE by itself.
    #[arg(long)]
    pub shard: Option<String>,
    /// Items per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Only the first N items of the list.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Default: 1024, as the official scripts.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Default: 0.2, as the official scripts.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sample among the K most likely tokens only (the official scripts leave transformers' default, 50, on);
    /// 0: no limit.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
}

impl JobArgs {
    pub fn sharding(&self) -> Result<Sharding> {
        Sharding::new(self.shard.as_deref())
    }

    pub fn options<'a>(&self, output: &Path, key_field: &'a str, unit: &'a str, prompts: &SticPrompts, sharding: &Sharding) -> JobOptions<'a> {
        let defaults = &prompts.generation;
        JobOptions {
            output: sharding.part(output),
            key_field,
            shard: sharding.shard(),
            batch_size: self.batch_size,
            limit: self.limit,
            sampling: SamplingConfig {
                max_new_tokens: self.max_new_tokens.unwrap_or(defaults.max_new_tokens),
                temperature: self.temperature.unwrap_or(defaults.temperature),
                top_p: defaults.top_p.unwrap_or(1.0),
                top_k: self.top_k,
                seed: self.seed,
            },
            template: Template::MistralInstruct,
            unit,
            progress: sharding.is_main(),
        }
    }
}

pub fn report(summary: &JobSummary, output: &Path) {
    eprintln!(
        "{}: {} written, {} already there, {} skipped",
        output.display(),
        summary.written,
        summary.already_done,
        summary.skipped.len()
    );
    for s in &summary.skipped {
        eprintln!("  skipped {s}");
    }
}

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

const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// The image names of a JSON list, or every image file in the folder (sorted).
pub fn image_list(image_dir: &Path, list: Option<&Path>) -> Result<Vec<String>> {
    if !image_dir.is_dir() {
        return Err(Error::Input(format!("image folder {} does not exist", image_dir.display())));
    }
    let names: Vec<String> = match list {
        Some(path) => stic::error::read_json(path)?,
        None => {
            let mut names: Vec<String> = std::fs::read_dir(image_dir)
                .map_err(|e| Error::io(image_dir, e))?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| Path::new(n).extension().and_then(|x| x.to_str()).is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_lowercase().as_str())))
                .collect();
            names.sort();
            names
        }
    };
    if names.is_empty() {
        return Err(Error::Input(format!("no images to process in {}", image_dir.display())));
    }
    Ok(names)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let names = image_list(&args.image_dir, args.images.as_deref())?;
    let prompts = SticPrompts::shipped();
    let sharding = args.job.sharding()?;
    let opts = args.job.options(&args.output, "image", "images", &prompts, &sharding);
    stic::fsutil::create_parent(&args.output)?;
    let session = args.model.load_for(&sharding)?;
    let task = PrefsTask {
        prompts,
        image_dir: &args.image_dir,
        seed: args.job.seed,
        model_name: args.model.model.display().to_string(),
        max_pixels: session.model.cfg.image.max_pixels,
        apply_corruption: args.corruption == CorruptionMode::Apply,
        resize_filter: match args.resize_filter {
            ResizeFilter::Bilinear => stic::image::Filter::Bilinear,
            ResizeFilter::Bicubic => stic::image::Filter::Bicubic,
        },
    };
    let summary = run_job(&session, &task, &names, &opts)?;
    report(&summary, &opts.output);
    sharding.finish(&[JobOutput { path: &args.output, key_field: "image", keys: &names }])?;
    Ok(())
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// Shard outputs to join.
    #[arg(long, required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    #[arg(long)]
    output: PathBuf,
    /// The image folder of the run (its images give the order), or use --images.
    #[arg(long)]
    image_dir: Option<PathBuf>,
    #[arg(long)]
    images: Option<PathBuf>,
    /// Merge `stic describe` shards instead (keyed and ordered by the entry ids of this LLaVA JSON).
    #[arg(long, conflicts_with_all = ["image_dir", "images"])]
    data: Option<PathBuf>,
}

pub fn run_merge(args: MergeArgs) -> anyhow::Result<()> {
    let (key, order) = match (&args.data, &args.image_dir, &args.images) {
        // `describe` only describes entries with an image.
        (Some(data), _, _) => ("id", stic::stic::infuse::load_instruction_data(data)?.iter().filter(|e| e.image.is_some()).map(|e| e.id_text()).collect()),
        (None, Some(dir), list) => ("image", image_list(dir, list.as_deref())?),
        (None, None, Some(list)) => ("image", stic::error::read_json::<Vec<String>>(list)?),
        _ => return Err(Error::Input("give --image-dir or --images (prefs shards), or --data (describe shards)".into()).into()),
    };
    let mut seen = std::collections::HashSet::new();
    let order: Vec<String> = order.into_iter().filter(|k| seen.insert(k.clone())).collect();
    let n = merge_shards(&args.inputs, &args.output, key, &order, MissingKeys::Refuse)?;
    eprintln!("{}: {n} records from {} shards", args.output.display(), args.inputs.len());
    Ok(())
}
