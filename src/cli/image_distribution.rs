use std::path::PathBuf;

use stic::eval::image_distribution::{image_distribution, BenchmarkSet, ImageDistributionOptions, ImageSet, PLOT_FILE};
use stic::eval::tsne;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder of any layout stic loads (or its hub id in the local cache): only its CLIP vision tower runs.
    #[arg(long, value_parser = super::model_args::hub_path)]
    model: PathBuf,
    /// An image set, NAME=PATH: an image folder, or an image list (a JSON list of names, or one name a line)
    /// whose images are in --image-dir (default: the list's folder). Repeat for each set (the stage-1 images and
    /// each benchmark's).
    #[arg(long = "set", required_unless_present = "benchmark_sets")]
    sets: Vec<ImageSet>,
    /// A benchmark's image set, NAME=DATA_DIR: the distinct images of the items of benchmark NAME as
    /// `stic eval --benchmark NAME --data DATA_DIR` loads them (files, or the images MMBench's TSV and the
    /// parquet releases embed). Repeat for each benchmark; drawn after the --set sets.
    #[arg(long = "benchmark-set")]
    benchmark_sets: Vec<BenchmarkSet>,
    /// The folder of the images named by the --set lists.
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// At most this many images of each set, a seeded draw without replacement.
    #[arg(long, default_value_t = 1000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    per_set: usize,
    /// Seed of the draws (ChaCha8, as `stic sample-images`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// t-SNE perplexity; must be less than the number of images.
    #[arg(long, default_value_t = 30.0, value_parser = positive)]
    perplexity: f64,
    /// The most t-SNE gradient steps (scikit-learn's max_iter; the first 250 are the early-exaggeration stage).
    #[arg(long, default_value_t = tsne::DEFAULT_MAX_ITERATIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(tsne::MIN_MAX_ITERATIONS as u64..))]
    max_iter: usize,
    /// Images per vision-tower batch.
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    batch_size: usize,
    /// The vision tower's dtype (auto: bf16 on CUDA, f32 on CPU); f32 by default, since the tower is small and
    /// the features are the output.
    #[arg(long, default_value = "f32", value_parser = super::choices::dtype())]
    dtype: String,
    /// cpu, cuda, cuda:N or auto (CUDA when there is a GPU); the t-SNE runs there too.
    #[arg(long, default_value = "auto", value_parser = super::choices::device)]
    device: String,
    /// Folder written: features.npy, init.csv, embedding.csv, summary.json and image_distribution.png.
    #[arg(long)]
    output: PathBuf,
}

fn positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("'{text}' is not a positive number")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = ImageDistributionOptions {
        model: args.model,
        sets: args.sets,
        benchmark_sets: args.benchmark_sets,
        image_dir: args.image_dir,
        per_set: args.per_set,
        seed: args.seed,
        perplexity: args.perplexity,
        max_iterations: args.max_iter,
        batch_size: args.batch_size,
        dtype: args.dtype,
        device: args.device,
        output: args.output,
    };
    let summary = image_distribution(&opts)?;
    let counts: Vec<String> = summary.sets.iter().map(|set| format!("{} {}", set.name, set.images)).collect();
    eprintln!(
        "{}: {} (KL {:.4} after {} steps)",
        opts.output.join(PLOT_FILE).display(),
        counts.join(", "),
        summary.kl_divergence,
        summary.iterations
    );
    Ok(())
}
