use std::path::{Path, PathBuf};

use super::model_args::ModelArgs;
use stic::generate::engine::EngineOptions;
use stic::generate::SamplingConfig;
use stic::stic::job::{run_job, JobOptions, JobSummary};
use stic::stic::jsonl::{merge_shards, MissingKeys};
use stic::stic::prefs::{PrefsTask, SticPrompts};
use stic::stic::sharding::{JobOutput, Sharding};
use stic::text::Template;
use stic::{Error, Result};

/// How the generation engine batches and sizes its cache (`generate`, `prefs`, `describe`, `eval`).
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Rows generated together: the engine's slots (a row that stops gives its slot to the next prompt).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Key/value cache positions for all rows together. Default: what --gpu-memory-fraction leaves on a GPU,
    /// as many as the rows need on the CPU. A prompt and its answer that need more stop the run (exit 2).
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Share of the GPU's memory that the model, the cache and a step's work may take together.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_fraction: f64,
    /// Prompt tokens prefilled per chunk; a longer prompt is prefilled over several steps, between decode steps
    /// (smaller chunks bound the step's memory and latency, at some cost in throughput).
    #[arg(long, default_value_t = 4096)]
    pub prefill_chunk: usize,
    /// Run decode steps eagerly on a GPU instead of replaying CUDA graphs.
    #[arg(long)]
    pub no_cuda_graphs: bool,
}

impl EngineArgs {
    pub fn options(&self) -> EngineOptions {
        EngineOptions {
            slots: self.batch_size,
            max_batch_tokens: self.max_batch_tokens,
            gpu_memory_fraction: self.gpu_memory_fraction,
            prefill_chunk: self.prefill_chunk,
            cuda_graphs: !self.no_cuda_graphs,
        }
    }
}

/// Sampling flags of the generation jobs; unset values come from third_party/stic/prompts.json.
#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// Process only the items whose position p in the list has p % N == I (join the outputs with
    /// `stic prefs-merge`). Under torchrun each rank takes shard RANK/WORLD_SIZE by itself.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Only the first N items of the list.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the sampling and of the corruptions (each item's own seed derives from it and its position).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Most tokens per response (the official scripts').
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature (the official scripts').
    #[arg(long, value_parser = super::values::temperature)]
    pub temperature: Option<f64>,
    /// Nucleus sampling's top-p. Default: the prompts file's, else 1 (off).
    #[arg(long, value_parser = super::values::top_p)]
    pub top_p: Option<f64>,
    /// Sample among the k most likely tokens. Default: the prompts file's, else 0 (off; transformers'
    /// `generate`, which the official scripts call, uses 50).
    #[arg(long)]
    pub top_k: Option<usize>,
    #[command(flatten)]
    pub summary: super::summary::SummaryArgs,
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
            top_p: self.top_p.or(defaults.top_p).unwrap_or(1.0),
            top_k: self.top_k.or(defaults.top_k).unwrap_or(0),
            seed: self.seed,
        };
        let template = Template::MistralInstruct;
        JobOptions {
            output: sharding.part(output),
            key_field,
            shard: sharding.shard(),
            limit: self.limit,
            settings: model.job_settings(&sampling, serde_json::json!({"task": task, "template": template, "prompts": prompts})),
            sampling,
            engine: self.engine.options(),
            template,
            unit,
            progress: sharding.is_main(),
        }
    }
}

/// Reports the job on stderr and writes its JSON summary beside `output` (`prefs.jsonl` → `prefs.summary.json`).
pub fn finish_job(summary: &JobSummary, output: &Path, started: std::time::Instant, args: &super::summary::SummaryArgs) -> Result<()> {
    report(summary, output);
    let seconds = started.elapsed().as_secs_f64();
    let path = output.with_extension("summary.json");
    let tokens = summary.engine.generated_tokens;
    let json = serde_json::json!({
        "output": output,
        "summary": path,
        "written": summary.written,
        "already_done": summary.already_done,
        "skipped": summary.skipped.len(),
        "skipped_reasons": summary.skipped,
        "context_stops": summary.context_stops.len(),
        "context_stopped_keys": summary.context_stops,
        "seconds": seconds,
        "generated_tokens": tokens,
        "tokens_per_second": if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 },
        "images_encoded": summary.images_encoded,
        "images_reused": summary.images_reused,
        "engine": summary.engine,
    });
    args.emit(&path, &json)
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
    let stops = &summary.context_stops;
    if !stops.is_empty() {
        let shown: Vec<&str> = stops.iter().take(10).map(String::as_str).collect();
        let more = if stops.len() > 10 { format!(" …and {} more", stops.len() - 10) } else { String::new() };
        eprintln!("  {} stopped at the context limit (prompt and response fill the model's context): {}{more}", stops.len(), shown.join(", "));
    }
    let e = &summary.engine;
    if e.finished_rows > 0 {
        eprintln!(
            "  {} rows, {} tokens generated, {} prompt tokens computed and {} shared from other rows' prefixes; {} images encoded, {} reused",
            e.finished_rows, e.generated_tokens, e.prefill_tokens, e.reused_prefix_tokens, summary.images_encoded, summary.images_reused
        );
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
        apply_corruption: args.corruption == CorruptionMode::Apply,
        resize_filter: match args.resize_filter {
            ResizeFilter::Bilinear => stic::image::Filter::Bilinear,
            ResizeFilter::Bicubic => stic::image::Filter::Bicubic,
        },
    };
    let started = std::time::Instant::now();
    let summary = run_job(&session, &task, &names, &opts)?;
    finish_job(&summary, &opts.output, started, &args.job.summary)?;
    sharding.finish(&[JobOutput { path: &args.output, key_field: "image", keys: &names }])?;
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
