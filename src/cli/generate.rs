use std::path::PathBuf;
use std::time::Instant;

use super::model_args::ModelArgs;
use stic::generate::{generate, SamplingConfig};
use stic::text::Template;
use stic::Error;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file; give it once for all prompts or once per prompt.
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    /// User prompt, rendered with --template; `<image>\n` is put in front unless the prompt places `<image>`.
    /// Repeat to generate a batch.
    #[arg(long = "prompt", conflicts_with = "texts")]
    prompts: Vec<String>,
    /// Raw text fed as is (BOS added, `<image>` expanded in place). Repeat to generate a batch.
    #[arg(long = "text")]
    texts: Vec<String>,
    #[arg(long, default_value = "mistral_instruct")]
    template: String,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after EOS (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON line per prompt.
    #[arg(long)]
    json: bool,
    /// Run the whole generation once (2 new tokens) before the timed run, so that the timings leave out what
    /// only a first run pays: CUDA loading its kernels lazily, the allocator growing (benchmarks).
    #[arg(long)]
    warmup: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let template: Template = args.template.parse()?;
    let texts: Vec<String> = if args.texts.is_empty() {
        if args.prompts.is_empty() {
            return Err(Error::Input("give --prompt TEXT or --text RAW".into()).into());
        }
        args.prompts.iter().map(|p| template.prompt(&stic::session::Session::user_text(p, true))).collect()
    } else {
        args.texts.clone()
    };
    if args.images.len() != 1 && args.images.len() != texts.len() {
        return Err(Error::Input(format!("{} images for {} prompts: give one image, or one per prompt", args.images.len(), texts.len())).into());
    }
    let session = args.model.load()?;
    let images = args.images.iter().map(|p| session.load_image(p)).collect::<stic::Result<Vec<_>>>()?;
    let seeds = vec![0; texts.len()];
    let eos = if args.ignore_eos { -1 } else { session.tokenizer.eos_id };
    let run = |max_new_tokens: usize| -> stic::Result<_> {
        let started = Instant::now();
        let mut prompts = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let image = &images[if images.len() == 1 { 0 } else { i }];
            prompts.push(session.prepare(text, session.image_features(&[image])?)?);
        }
        let encode_seconds = started.elapsed().as_secs_f64();
        let cfg = SamplingConfig { max_new_tokens, temperature: args.temperature, top_p: args.top_p, top_k: 0, seed: args.seed };
        let (outputs, timing) = generate(&session.model, &prompts, &seeds, &cfg, eos, session.tokenizer.pad_id)?;
        Ok((outputs, encode_seconds + timing.prefill_seconds, timing.decode_seconds, started.elapsed().as_secs_f64()))
    };
    if args.warmup {
        run(2)?;
    }
    let (outputs, prefill_seconds, decode_seconds, seconds) = run(args.max_new_tokens)?;
    for out in &outputs {
        let text = session.tokenizer.decode(&out.tokens, true)?;
        if args.json {
            let line = serde_json::json!({
                "text": text,
                "tokens": out.tokens,
                "prompt_tokens": out.prompt_tokens,
                "stopped_at_eos": out.stopped_at_eos,
                "seconds": seconds,
                "prefill_seconds": prefill_seconds,
                "decode_seconds": decode_seconds,
                "batch_size": outputs.len(),
                "gpu_memory_gib": gpu_memory_gib(),
            });
            println!("{line}");
        } else {
            println!("{text}");
        }
    }
    Ok(())
}

/// CUDA memory this process holds at the end, as the driver reports it (libtorch's caching allocator keeps what
/// the run needed at its peak); None on CPU.
fn gpu_memory_gib() -> Option<f64> {
    if !tch::Cuda::is_available() {
        return None;
    }
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    let pid = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split_once(',').filter(|(p, _)| p.trim() == pid).and_then(|(_, m)| m.trim().parse::<f64>().ok()))
        .map(|mib| mib / 1024.0)
}
