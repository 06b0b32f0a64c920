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
    #[arg(long, value_parser = super::values::temperature)]
    pub temperature: Option<f64>,
}

impl JobArgs {
    pub fn sharding(&self) -> Result<Sharding> {
        Sharding::new(self.shard.as_deref())
    }

    /// `task` names the job in the settings its output records (with the model's and the prompts).
    pub fn options<'a>(&self, output: &Path, key_field: &'a str, unit: &'a str, prompts: &SticPrompts, sharding: &Sharding, model: &ModelArgs, task: &str) -> JobOptions<'a> {
        let defaults = &prompts.generation;
        let sampling = SamplingConfig {
            max_new_tokens: self.max_new_tokens.unwrap_or(defaults.max_new_tokens),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: defaults.top_p.unwrap_or(1.0),
            seed: self.seed,
        };
        let template = Template::MistralInstruct;
        JobOptions {
            output: sharding.part(output),
            key_field,
            shard: sharding.shard(),
            batch_size: self.batch_size,
            limit: self.limit,
            settings: model.job_settings(&sampling, serde_json::json!({"task": task, "template": template, "prompts": prompts})),
            sampling,
            template,
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
    #[command(flatten)]
    job: JobArgs,
}

const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// The image names of a JSON list, or every image file in the folder (sorted).
pub fn image_list(image_dir: &Path, list: Option<&Path>) -> Result<Vec<String>> {
    if image_dir.is_file() {
        return Err(Error::Input(format!("image folder {} is a file: give the folder that holds the images", image_dir.display())));
    }
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
    match list {
        Some(path) if names.is_empty() => Err(Error::Input(format!("the image list {} is empty: name the images to process", path.display()))),
        None if names.is_empty() => Err(Error::Input(format!("no images to process in {}", image_dir.display()))),
        _ => Ok(names),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let list: Vec<(&str, &Path)> = args.images.as_deref().map(|list| ("--images", list)).into_iter().collect();
    args.model.check_output("--output", &args.output, &list)?;
    let names = image_list(&args.image_dir, args.images.as_deref())?;
    let prompts = SticPrompts::shipped();
    let sharding = args.job.sharding()?;
    let opts = args.job.options(&args.output, "image", "images", &prompts, &sharding, &args.model, "prefs");
    stic::fsutil::create_parent(&args.output)?;
    let session = args.model.load_for(&sharding)?;
    let task = PrefsTask {
        prompts,
        image_dir: &args.image_dir,
        seed: args.job.seed,
        model_name: args.model.model.display().to_string(),
        max_pixels: session.model.cfg.image.max_pixels,
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
    let mut inputs: Vec<(&str, &Path)> = args.inputs.iter().map(|shard| ("--inputs", shard.as_path())).collect();
    inputs.extend(args.images.as_deref().map(|list| ("--images", list)));
    inputs.extend(args.data.as_deref().map(|data| ("--data", data)));
    stic::fsutil::check_output("--output", &args.output, &inputs)?;
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
