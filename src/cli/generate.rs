use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::model_args::ModelArgs;
use super::prefs::EngineArgs;
use stic::generate::engine::{Engine, Refusal, Request};
use stic::generate::images::{FeatureCache, ImageKey};
use stic::generate::{static_batch, Generated, PreparedPrompt, SamplingConfig};
use stic::session::Session;
use stic::text::Template;
use stic::{Error, Result};

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

/// One prompt as given: its image, its full text and its length limit.
struct Spec {
    image: Option<PathBuf>,
    text: String,
    max_new_tokens: usize,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    image: Option<PathBuf>,
    prompt: Option<String>,
    text: Option<String>,
    max_new_tokens: Option<usize>,
}

/// The prompts of the command line, or of the requests file read line by line.
fn specs(args: &Args, template: Template) -> Result<Box<dyn Iterator<Item = Result<Spec>>>> {
    let max_new_tokens = args.max_new_tokens;
    if let Some(path) = &args.requests {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let path = path.clone();
        let lines = std::io::BufReader::new(file).lines().enumerate().filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()));
        return Ok(Box::new(lines.map(move |(i, line)| {
            let at = || format!("{} line {}", path.display(), i + 1);
            let line = line.map_err(|e| Error::io(&path, e))?;
            let r: RequestLine = serde_json::from_str(&line).map_err(|e| Error::Input(format!("{}: {e}", at())))?;
            let text = match (r.prompt, r.text) {
                (Some(p), None) => template.prompt(&Session::user_text(&p, r.image.is_some())),
                (None, Some(t)) => t,
                _ => return Err(Error::Input(format!("{}: give either \"prompt\" or \"text\"", at()))),
            };
            Ok(Spec { image: r.image, text, max_new_tokens: r.max_new_tokens.unwrap_or(max_new_tokens) })
        })));
    }
    let texts: Vec<String> = if args.texts.is_empty() {
        if args.prompts.is_empty() {
            return Err(Error::Input("give --prompt TEXT, --text RAW or --requests FILE".into()));
        }
        args.prompts.iter().map(|p| template.prompt(&Session::user_text(p, true))).collect()
    } else {
        args.texts.clone()
    };
    if args.images.is_empty() || (args.images.len() != 1 && args.images.len() != texts.len()) {
        return Err(Error::Input(format!("{} images for {} prompts: give one image, or one per prompt", args.images.len(), texts.len())));
    }
    let images = args.images.clone();
    Ok(Box::new(texts.into_iter().enumerate().map(move |(i, text)| {
        Ok(Spec { image: Some(images[if images.len() == 1 { 0 } else { i }].clone()), text, max_new_tokens })
    })))
}

/// Tokenises a prompt and encodes its image (once per distinct image while it is cached).
fn prepare(session: &Session, spec: &Spec, features: &mut FeatureCache) -> Result<(PreparedPrompt, Vec<ImageKey>)> {
    let Some(path) = &spec.image else { return Ok((session.prepare(&spec.text, Vec::new())?, Vec::new())) };
    let image = stic::image::load_image(path, session.model.cfg.image.max_pixels)?;
    let key = ImageKey::of(&image);
    let encoded = features.get_or_encode(key, || {
        Ok(session.image_features(&[&stic::image::preprocess(&image, &session.model.cfg.image)])?.remove(0))
    })?;
    Ok((session.prepare(&spec.text, vec![encoded])?, vec![key]))
}

#[derive(Default, serde::Serialize)]
struct RunStats {
    mode: &'static str,
    requests: usize,
    prompt_tokens: usize,
    generated_tokens: usize,
    seconds: f64,
    /// CPU time of the run (all threads), firmer than wall time on a shared machine.
    cpu_seconds: f64,
    /// Reading, encoding and tokenising the prompts' images and texts.
    prepare_seconds: f64,
    /// The prompts' forward passes and first tokens.
    prefill_seconds: f64,
    decode_seconds: f64,
    images_encoded: usize,
    images_reused: usize,
    engine: Option<stic::generate::engine::EngineStats>,
    peak_rss_gib: Option<f64>,
    gpu_memory_gib: Option<f64>,
}

struct Run<'a> {
    session: &'a Session,
    cfg: SamplingConfig,
    eos: i64,
    args: &'a Args,
}

impl Run<'_> {
    /// Runs every spec through the engine; `emit` gets each output in input order as soon as it and all before
    /// it are done.
    fn engine(&self, specs: impl Iterator<Item = Result<Spec>>, emit: &mut dyn FnMut(Generated) -> Result<()>, stats: &mut RunStats) -> Result<()> {
        let opts = self.args.engine.options();
        let mut engine: Engine<usize> = Engine::new(&self.session.model, self.cfg.clone(), self.eos, opts.clone())?;
        let mut features = FeatureCache::new(2 * opts.slots + 2);
        let mut specs = specs.peekable();
        let (mut submitted, mut next) = (0, 0);
        let mut done: BTreeMap<usize, Generated> = BTreeMap::new();
        loop {
            while engine.queued() < opts.slots {
                let Some(spec) = specs.next().transpose()? else { break };
                let started = Instant::now();
                let (prompt, images) = prepare(self.session, &spec, &mut features)?;
                stats.prepare_seconds += started.elapsed().as_secs_f64();
                stats.prompt_tokens += prompt.ids.len();
                let request = Request { prompt, images, row_seed: 0, max_new_tokens: spec.max_new_tokens };
                engine.submit(submitted, request).map_err(|r| match r {
                    Refusal::TooLong(e) | Refusal::CannotFit(e) => e,
                })?;
                submitted += 1;
            }
            if engine.is_idle() && specs.peek().is_none() {
                break;
            }
            done.extend(engine.step()?);
            while let Some(output) = done.remove(&next) {
                stats.generated_tokens += output.tokens.len();
                emit(output)?;
                next += 1;
            }
        }
        stats.requests = submitted;
        stats.prefill_seconds = engine.stats.prefill_seconds;
        stats.decode_seconds = engine.stats.decode_seconds;
        stats.images_encoded = features.encoded;
        stats.images_reused = features.reused;
        stats.engine = Some(engine.stats.clone());
        Ok(())
    }

    /// Runs the specs in static batches of --batch-size.
    fn static_batches(&self, specs: impl Iterator<Item = Result<Spec>>, emit: &mut dyn FnMut(Generated) -> Result<()>, stats: &mut RunStats) -> Result<()> {
        let batch = self.args.engine.batch_size.max(1);
        let mut specs = specs.peekable();
        while specs.peek().is_some() {
            let chunk: Vec<Spec> = specs.by_ref().take(batch).collect::<Result<_>>()?;
            let mut prompts = Vec::with_capacity(chunk.len());
            let started = Instant::now();
            for spec in &chunk {
                // every prompt encodes its image, as before the engine
                prompts.push(prepare(self.session, spec, &mut FeatureCache::new(1))?.0);
                stats.images_encoded += usize::from(spec.image.is_some());
            }
            stats.prepare_seconds += started.elapsed().as_secs_f64();
            let limits: Vec<usize> = chunk.iter().map(|s| s.max_new_tokens).collect();
            let seeds = vec![0; prompts.len()];
            let (outputs, timing) = static_batch::generate(&self.session.model, &prompts, &seeds, &limits, &self.cfg, self.eos, self.session.tokenizer.pad_id)?;
            stats.prefill_seconds += timing.prefill_seconds;
            stats.decode_seconds += timing.decode_seconds;
            stats.requests += prompts.len();
            stats.prompt_tokens += prompts.iter().map(|p| p.ids.len()).sum::<usize>();
            for output in outputs {
                stats.generated_tokens += output.tokens.len();
                emit(output)?;
            }
        }
        Ok(())
    }

    fn all(&self, specs: impl Iterator<Item = Result<Spec>>, emit: &mut dyn FnMut(Generated) -> Result<()>, stats: &mut RunStats) -> Result<()> {
        if self.args.static_batching {
            self.static_batches(specs, emit, stats)
        } else {
            self.engine(specs, emit, stats)
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let template: Template = args.template.parse()?;
    let mut specs = specs(&args, template)?.peekable();
    let session = args.model.load()?;
    let cfg = SamplingConfig { max_new_tokens: args.max_new_tokens, temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed };
    cfg.validate()?;
    let eos = if args.ignore_eos { -1 } else { session.tokenizer.eos_id };
    let run = Run { session: &session, cfg, eos, args: &args };
    let mut first = Vec::new();
    if let Some(Ok(spec)) = specs.peek() {
        first.push(Spec { image: spec.image.clone(), text: spec.text.clone(), max_new_tokens: spec.max_new_tokens });
    }
    if args.warmup && !first.is_empty() {
        first[0].max_new_tokens = 2;
        run.all(first.into_iter().map(Ok), &mut |_| Ok(()), &mut RunStats::default())?;
    }
    let mut stats = RunStats { mode: if args.static_batching { "static" } else { "engine" }, ..Default::default() };
    let started = Instant::now();
    let cpu_started = cpu_seconds();
    let mut outputs = Vec::new();
    let mut emit = |output: Generated| -> Result<()> {
        if !args.json {
            println!("{}", session.tokenizer.decode(&output.tokens, true)?);
        }
        outputs.push(output);
        Ok(())
    };
    run.all(specs, &mut emit, &mut stats)?;
    stats.seconds = started.elapsed().as_secs_f64();
    stats.cpu_seconds = cpu_seconds() - cpu_started;
    stats.peak_rss_gib = peak_rss_gib();
    stats.gpu_memory_gib = gpu_memory_gib();
    if args.json {
        let batch_size = args.engine.batch_size.min(outputs.len());
        for out in &outputs {
            let line = serde_json::json!({
                "text": session.tokenizer.decode(&out.tokens, true)?,
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
    }
    if let Some(path) = &args.stats_out {
        write_stats(path, &stats)?;
    }
    Ok(())
}

fn write_stats(path: &Path, stats: &RunStats) -> Result<()> {
    stic::fsutil::write_atomic(path, serde_json::to_string_pretty(stats).expect("stats serialise").as_bytes())
}

/// User and system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The most resident memory this process has held (Linux).
fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0 / 1024.0)
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
