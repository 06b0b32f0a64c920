//! `stic generate`: prompts from the command line or a requests file, run through the engine (or in static
//! batches), with the figures of the run.
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::engine::{Engine, EngineOptions, EngineStats, Refusal, Request};
use super::images::{FeatureCache, ImageKey};
use super::session::{ModelSpec, Session};
use super::{static_batch, Generated, PreparedPrompt, SamplingConfig};
use crate::error::{Error, Result};
use crate::text::Template;

/// What `stic generate` is asked to do.
pub struct GenerateOptions {
    pub model: ModelSpec,
    /// Image files: one for all prompts or one per prompt.
    pub images: Vec<PathBuf>,
    /// User prompts, rendered with `template`.
    pub prompts: Vec<String>,
    /// Raw texts fed as they are (instead of `prompts`).
    pub texts: Vec<String>,
    /// A JSON-lines file of requests (instead of the above).
    pub requests: Option<PathBuf>,
    pub template: Template,
    /// `max_new_tokens` is that of every prompt but the requests that give their own.
    pub sampling: SamplingConfig,
    pub engine: EngineOptions,
    /// Static batches of `engine.slots` prompts (8 for `auto`) instead of the engine.
    pub static_batching: bool,
    /// Keep generating after EOS.
    pub ignore_eos: bool,
    /// Generate 2 tokens for the first prompt once before the timed run.
    pub warmup: bool,
    /// Where to write the run's figures as JSON.
    pub stats_out: Option<PathBuf>,
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
fn specs(opts: &GenerateOptions) -> Result<Box<dyn Iterator<Item = Result<Spec>>>> {
    let template = opts.template;
    let max_new_tokens = opts.sampling.max_new_tokens;
    if let Some(path) = &opts.requests {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let path = path.clone();
        let lines = std::io::BufReader::new(file)
            .lines()
            .enumerate()
            .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()));
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
    let texts: Vec<String> = if opts.texts.is_empty() {
        if opts.prompts.is_empty() {
            return Err(Error::Input("give --prompt TEXT, --text RAW or --requests FILE".into()));
        }
        opts.prompts.iter().map(|p| template.prompt(&Session::user_text(p, true))).collect()
    } else {
        opts.texts.clone()
    };
    if opts.images.is_empty() || (opts.images.len() != 1 && opts.images.len() != texts.len()) {
        return Err(Error::Input(format!(
            "{} images for {} prompts: give one image, or one per prompt",
            opts.images.len(),
            texts.len()
        )));
    }
    let images = opts.images.clone();
    Ok(Box::new(texts.into_iter().enumerate().map(move |(i, text)| {
        Ok(Spec { image: Some(images[if images.len() == 1 { 0 } else { i }].clone()), text, max_new_tokens })
    })))
}

/// Tokenises a prompt and encodes its image (once per distinct image while it is cached).
fn prepare(session: &Session, spec: &Spec, features: &mut FeatureCache) -> Result<(PreparedPrompt, Vec<ImageKey>)> {
    let Some(path) = &spec.image else { return Ok((session.prepare(&spec.text, Vec::new())?, Vec::new())) };
    let image = crate::image::load_image(path, session.model.cfg.image.max_pixels)?;
    let key = ImageKey::of(&image);
    let encoded = features.get_or_encode(key, || {
        Ok(session.image_features(&[&crate::image::preprocess(&image, &session.model.cfg.image)])?.remove(0))
    })?;
    Ok((session.prepare(&spec.text, vec![encoded])?, vec![key]))
}

/// The figures of a run (`--stats-out`).
#[derive(Default, serde::Serialize)]
pub struct RunStats {
    pub mode: &'static str,
    pub requests: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
    /// CPU time of the run (all threads), firmer than wall time on a shared machine.
    pub cpu_seconds: f64,
    /// Reading, encoding and tokenising the prompts' images and texts.
    pub prepare_seconds: f64,
    /// The prompts' forward passes and first tokens.
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub images_encoded: usize,
    pub images_reused: usize,
    pub engine: Option<EngineStats>,
    pub peak_rss_gib: Option<f64>,
    pub gpu_memory_gib: Option<f64>,
}

struct Run<'a> {
    session: &'a Session,
    cfg: SamplingConfig,
    stop_ids: Vec<i64>,
    opts: &'a GenerateOptions,
}

impl Run<'_> {
    /// Runs every spec through the engine; `emit` gets each output in input order as soon as it and all before
    /// it are done.
    fn engine(
        &self,
        specs: impl Iterator<Item = Result<Spec>>,
        emit: &mut dyn FnMut(Generated) -> Result<()>,
        stats: &mut RunStats,
    ) -> Result<()> {
        let opts = &self.opts.engine;
        let mut engine: Engine<usize> =
            Engine::new(&self.session.model, self.cfg.clone(), self.stop_ids.clone(), opts.clone())?;
        let mut features = FeatureCache::for_rows(engine.rows());
        let mut specs = specs.peekable();
        let (mut submitted, mut next) = (0, 0);
        let mut done: BTreeMap<usize, Generated> = BTreeMap::new();
        loop {
            while engine.queued() < engine.rows() {
                features.fit_rows(engine.rows());
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

    /// Runs the specs in static batches of `engine.slots` prompts (8 for `auto`).
    fn static_batches(
        &self,
        specs: impl Iterator<Item = Result<Spec>>,
        emit: &mut dyn FnMut(Generated) -> Result<()>,
        stats: &mut RunStats,
    ) -> Result<()> {
        let batch = self.opts.engine.slots.static_rows();
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
            let (outputs, timing) = static_batch::generate(
                &self.session.model,
                &prompts,
                &seeds,
                &limits,
                &self.cfg,
                &self.stop_ids,
                self.session.tokenizer.pad_id,
            )?;
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

    fn all(
        &self,
        specs: impl Iterator<Item = Result<Spec>>,
        emit: &mut dyn FnMut(Generated) -> Result<()>,
        stats: &mut RunStats,
    ) -> Result<()> {
        if self.opts.static_batching {
            self.static_batches(specs, emit, stats)
        } else {
            self.engine(specs, emit, stats)
        }
    }
}

/// Generates a response for every prompt; `emit` gets each one's decoded text and output in input order, as soon
/// as it and all before it are done. Returns the run's figures (also written to `opts.stats_out`).
pub fn run(opts: &GenerateOptions, emit: &mut dyn FnMut(String, Generated) -> Result<()>) -> Result<RunStats> {
    let mut specs = specs(opts)?.peekable();
    let session = opts.model.load()?;
    opts.sampling.validate()?;
    let stop_ids = if opts.ignore_eos { Vec::new() } else { session.stop_ids() };
    let run = Run { session: &session, cfg: opts.sampling.clone(), stop_ids, opts };
    let mut first = Vec::new();
    if let Some(Ok(spec)) = specs.peek() {
        first.push(Spec { image: spec.image.clone(), text: spec.text.clone(), max_new_tokens: spec.max_new_tokens });
    }
    if opts.warmup && !first.is_empty() {
        first[0].max_new_tokens = 2;
        run.all(first.into_iter().map(Ok), &mut |_| Ok(()), &mut RunStats::default())?;
    }
    let mut stats = RunStats { mode: if opts.static_batching { "static" } else { "engine" }, ..Default::default() };
    let started = Instant::now();
    let cpu_started = cpu_seconds();
    let mut decoded =
        |output: Generated| -> Result<()> { emit(session.tokenizer.decode(&output.tokens, true)?, output) };
    run.all(specs, &mut decoded, &mut stats)?;
    stats.seconds = started.elapsed().as_secs_f64();
    stats.cpu_seconds = cpu_seconds() - cpu_started;
    stats.peak_rss_gib = peak_rss_gib();
    stats.gpu_memory_gib = gpu_memory_gib();
    if let Some(path) = &opts.stats_out {
        write_stats(path, &stats)?;
    }
    Ok(stats)
}

fn write_stats(path: &Path, stats: &RunStats) -> Result<()> {
    crate::fsutil::write_atomic(path, serde_json::to_string_pretty(stats).expect("stats serialise").as_bytes())
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
    let kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
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
        .find_map(|l| {
            l.split_once(',').filter(|(p, _)| p.trim() == pid).and_then(|(_, m)| m.trim().parse::<f64>().ok())
        })
        .map(|mib| mib / 1024.0)
}
