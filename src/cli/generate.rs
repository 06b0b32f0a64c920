use std::path::PathBuf;

use super::job_args::EngineArgs;
use super::model_args::ModelArgs;
use stic::generate::requests::{run as generate, GenerateOptions};
use stic::generate::{Generated, SamplingConfig};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file; give it once for all prompts or once per prompt.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// User prompt, rendered with --template; `<image>\n` is put in front unless the prompt places `<image>`.
    /// Repeat to generate a batch.
    #[arg(long = "prompt", conflicts_with = "texts")]
    prompts: Vec<String>,
    /// Raw text fed as is (BOS added, `<image>` expanded in place). Repeat to generate a batch.
    #[arg(long = "text")]
    texts: Vec<String>,
    /// JSON lines, one request each: `{"image": PATH or null, "prompt": TEXT}` (or `"text": RAW`), optionally
    /// `"max_new_tokens": N`; read as the generation goes, so the file may be long.
    #[arg(long, conflicts_with_all = ["images", "prompts", "texts"])]
    requests: Option<PathBuf>,
    /// Conversation template that --prompt is rendered with.
    #[arg(long, default_value = "mistral_instruct", value_parser = super::choices::template())]
    template: String,
    /// Most tokens generated per prompt.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, value_parser = super::values::temperature)]
    temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = super::values::top_p)]
    top_p: f64,
    /// Sample among the k most likely tokens only; 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    engine: EngineArgs,
    /// Static batches instead of the engine: --batch-size prompts at a time, left-padded, each batch decoded
    /// until its last row stops, every image encoded for every prompt (what stic did before; benchmarks).
    #[arg(long)]
    static_batching: bool,
    /// Keep generating after EOS (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON line per prompt.
    #[arg(long)]
    json: bool,
    /// Generate 2 tokens for the first prompt once before the timed run, so that the timings leave out what only
    /// a first run pays: CUDA loading its kernels lazily, the allocator growing (benchmarks).
    #[arg(long)]
    warmup: bool,
    /// Write the run's figures here as JSON: tokens, prefill and decode seconds, images encoded, peak memory.
    #[arg(long)]
    stats_out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = GenerateOptions {
        model: args.model.spec(args.seed),
        images: args.images,
        prompts: args.prompts,
        texts: args.texts,
        requests: args.requests,
        template: args.template.parse()?,
        sampling: SamplingConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        engine: args.engine.options(),
        static_batching: args.static_batching,
        ignore_eos: args.ignore_eos,
        warmup: args.warmup,
        stats_out: args.stats_out,
    };
    let mut outputs: Vec<(String, Generated)> = Vec::new();
    let stats = generate(&opts, &mut |text, output| {
        if args.json {
            outputs.push((text, output));
        } else {
            println!("{text}");
        }
        Ok(())
    })?;
    let rows = stats.engine.as_ref().map_or(args.engine.batch_size.static_rows(), |e| e.cache_slots);
    let batch_size = rows.min(outputs.len());
    for (text, out) in &outputs {
        let line = serde_json::json!({
            "text": text,
            "tokens": out.tokens,
            "prompt_tokens": out.prompt_tokens,
            "stop": out.stop,
            "seconds": stats.seconds,
            "prefill_seconds": stats.prepare_seconds + stats.prefill_seconds,
            "decode_seconds": stats.decode_seconds,
            "batch_size": batch_size,
            "gpu_memory_gib": stats.gpu_memory_gib,
        });
        println!("{line}");
    }
    Ok(())
}
