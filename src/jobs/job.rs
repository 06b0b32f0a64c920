//! The resumable, shardable generation loop of `stic prefs`, `stic describe` and `stic eval`, on the
//! continuous-batching engine.
//!
//! Items are prepared lazily, a few ahead of the engine (images decoded, encoded and tokenised only when their
//! requests are about to run), so a job of any length holds a bounded window in memory. Each distinct image is
//! encoded once while its requests are near. Records are written in input order as soon as an item and every
//! item before it are done.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::jsonl::ResumableJsonl;
use super::shard::Shard;
use super::sharding::{JobOutput, Sharding};
use crate::error::{Error, Result};
use crate::generate::engine::{Engine, EngineOptions, EngineStats, Refusal, Request as EngineRequest};
use crate::generate::images::{FeatureCache, ImageKey};
use crate::generate::session::{ModelSpec, Session};
use crate::generate::{SamplingConfig, StopReason};
use crate::progress::Progress;
use crate::text::Template;

/// One generation request of an item: the user text (without `<image>`) and the image it looks at.
pub struct Request {
    pub user_text: String,
    pub image: Option<::image::RgbImage>,
}

/// What a job does with each item: the requests to generate, then the record to store from their outputs.
pub trait GenerationTask {
    type Item;
    type Plan;
    fn key(&self, item: &Self::Item) -> String;
    /// `Err` skips the item (reported, not stored, retried on the next run).
    fn plan(&self, position: usize, item: &Self::Item) -> std::result::Result<(Self::Plan, Vec<Request>), String>;
    fn record(&self, position: usize, item: &Self::Item, plan: Self::Plan, outputs: Vec<String>) -> serde_json::Value;
}

pub struct JobOptions<'a> {
    pub output: PathBuf,
    pub key_field: &'a str,
    pub shard: Shard,
    pub limit: Option<usize>,
    pub sampling: SamplingConfig,
    pub engine: EngineOptions,
    pub template: Template,
    pub unit: &'a str,
    /// Show progress (off on the ranks other than 0 under torchrun).
    pub progress: bool,
    /// What the records depend on (model, sampling, prompts…): a rerun into the output must have the same.
    pub settings: serde_json::Value,
}

pub struct JobSummary {
    pub written: usize,
    pub already_done: usize,
    pub skipped: Vec<String>,
    /// Keys of the written items with a response that the model's context cut short.
    pub context_stops: Vec<String>,
    pub engine: EngineStats,
    /// Images run through the vision tower, and requests that reused an image encoded for another.
    pub images_encoded: usize,
    pub images_reused: usize,
}

impl JobSummary {
    /// Reports the job on stderr: what was written, skipped and cut short at the context limit, and the engine's
    /// counts.
    pub fn report(&self, output: &Path) {
        eprintln!(
            "{}: {} written, {} already there, {} skipped",
            output.display(),
            self.written,
            self.already_done,
            self.skipped.len()
        );
        for s in &self.skipped {
            eprintln!("  skipped {s}");
        }
        let stops = &self.context_stops;
        if !stops.is_empty() {
            let shown: Vec<&str> = stops.iter().take(10).map(String::as_str).collect();
            let more = if stops.len() > 10 { format!(" …and {} more", stops.len() - 10) } else { String::new() };
            eprintln!(
                "  {} stopped at the context limit (prompt and response fill the model's context): {}{more}",
                stops.len(),
                shown.join(", ")
            );
        }
        let e = &self.engine;
        if e.finished_rows > 0 {
            eprintln!(
                "  {} rows, {} tokens generated, {} prompt tokens computed and {} shared from other rows' prefixes; {} images encoded, {} reused",
                e.finished_rows, e.generated_tokens, e.prefill_tokens, e.reused_prefix_tokens, self.images_encoded, self.images_reused
            );
        }
    }

    /// Reports the job on stderr and writes its JSON summary beside `output` (`prefs.jsonl` →
    /// `prefs.summary.json`), also printed on stdout with `print`.
    pub fn finish(&self, output: &Path, started: Instant, print: bool) -> Result<()> {
        self.report(output);
        let seconds = started.elapsed().as_secs_f64();
        let path = output.with_extension("summary.json");
        let tokens = self.engine.generated_tokens;
        let json = serde_json::json!({
            "output": output,
            "summary": path,
            "written": self.written,
            "already_done": self.already_done,
            "skipped": self.skipped.len(),
            "skipped_reasons": self.skipped,
            "context_stops": self.context_stops.len(),
            "context_stopped_keys": self.context_stops,
            "seconds": seconds,
            "generated_tokens": tokens,
            "tokens_per_second": if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 },
            "images_encoded": self.images_encoded,
            "images_reused": self.images_reused,
            "engine": self.engine,
        });
        crate::summary::write_summary(&path, &json, print)
    }
}

/// A generation job as a command runs it: this process's share of the items (`--shard I/N`, or its rank's under
/// torchrun), the model loaded for it, the records resumed in `output`, a summary at the end, and under torchrun
/// the ranks' files joined into `output` on rank 0.
pub struct ShardedJob<'a> {
    pub model: &'a ModelSpec,
    /// The output of the whole job (the file an unsharded run writes, or the `--shard`'s own).
    pub output: &'a Path,
    pub key_field: &'a str,
    /// What the progress bar and the messages call the items.
    pub unit: &'a str,
    /// The `--shard I/N` flag, if given.
    pub shard: Option<&'a str>,
    pub limit: Option<usize>,
    pub sampling: SamplingConfig,
    pub engine: EngineOptions,
    pub template: Template,
    /// What the records depend on besides the model and the sampling (a JSON object: task, prompts…).
    pub task_settings: serde_json::Value,
    /// Print the JSON summary on stdout too.
    pub print_summary: bool,
}

impl ShardedJob<'_> {
    /// Runs the task that `task` makes for the loaded model over `items`.
    pub fn run<T: GenerationTask>(&self, items: &[T::Item], task: impl FnOnce(&Session) -> T) -> Result<JobSummary> {
        let sharding = Sharding::new(self.shard)?;
        let opts = JobOptions {
            output: sharding.part(self.output),
            key_field: self.key_field,
            shard: sharding.shard(),
            limit: self.limit,
            settings: self.model.job_settings(&self.sampling, self.task_settings.clone()),
            sampling: self.sampling.clone(),
            engine: self.engine.clone(),
            template: self.template,
            unit: self.unit,
            progress: sharding.is_main(),
        };
        crate::fsutil::create_parent(self.output)?;
        let session = sharding.load(self.model)?;
        let task = task(&session);
        let started = Instant::now();
        let summary = run_job(&session, &task, items, &opts)?;
        summary.finish(&opts.output, started, self.print_summary)?;
        let keys: Vec<String> = items.iter().map(|item| task.key(item)).collect();
        sharding.finish(&[JobOutput { path: self.output, key_field: self.key_field, keys: &keys }])?;
        Ok(summary)
    }
}

/// The row seed of request `k` of the item at `position`: the item's place in the whole list, so that its
/// samples do not depend on batching, sharding or resumption.
pub fn row_seed(position: usize, k: usize) -> u64 {
    ((position as u64) << 8) | k as u64
}

/// An item between planning and writing.
struct Pending<P> {
    position: usize,
    plan: Option<P>,
    outputs: Vec<Option<String>>,
    /// Why it is skipped, once it is.
    skipped: Option<String>,
    context_stop: bool,
}

impl<P> Pending<P> {
    fn complete(&self) -> bool {
        self.skipped.is_some() || self.outputs.iter().all(Option::is_some)
    }
}

/// Runs `task` over the items this shard owns that are not in the output yet. A key listed twice is generated
/// once, at its first position.
pub fn run_job<T: GenerationTask>(
    session: &Session,
    task: &T,
    items: &[T::Item],
    opts: &JobOptions,
) -> Result<JobSummary> {
    let mut out = ResumableJsonl::open(&opts.output, opts.key_field, &opts.settings)?;
    let limit = opts.limit.unwrap_or(items.len()).min(items.len());
    let mut seen = std::collections::HashSet::new();
    let first_listing: Vec<bool> = items[..limit].iter().map(|item| seen.insert(task.key(item))).collect();
    let repeated = first_listing.iter().filter(|&&first| !first).count();
    if repeated > 0 {
        eprintln!("{repeated} item(s) listed more than once: each is generated once");
    }
    let mine: Vec<usize> = (0..limit).filter(|&p| first_listing[p] && opts.shard.owns(p)).collect();
    let todo: Vec<usize> = mine.iter().copied().filter(|&p| !out.is_done(&task.key(&items[p]))).collect();
    let already_done = mine.len() - todo.len();
    let mut bar = Progress::new(todo.len() as u64, 0, opts.unit, opts.unit, opts.progress);
    bar.set_message(format!("shard {}", opts.shard));
    let mut summary = JobSummary {
        written: 0,
        already_done,
        skipped: Vec::new(),
        context_stops: Vec::new(),
        engine: EngineStats::default(),
        images_encoded: 0,
        images_reused: 0,
    };
    let tokenizer = &session.tokenizer;
    let mut engine: Engine<(usize, usize)> =
        Engine::new(&session.model, opts.sampling.clone(), session.stop_ids(), opts.engine.clone())?;
    let mut features = FeatureCache::for_rows(engine.rows());
    // pending[i] is todo[first + i]; tags are (index in todo, request of the item)
    let mut pending: VecDeque<Pending<T::Plan>> = VecDeque::new();
    let mut first = 0;
    let mut planned = 0;
    loop {
        // Items done but waiting for an earlier one to be written are at most 64 batches: a bound on memory when
        // one row runs long.
        while engine.queued() < engine.rows() && pending.len() < 64 * engine.rows() && planned < todo.len() {
            features.fit_rows(engine.rows());
            let position = todo[planned];
            pending.push_back(plan_item(
                session,
                task,
                &items[position],
                position,
                planned,
                opts,
                &mut engine,
                &mut features,
            )?);
            planned += 1;
        }
        if engine.is_idle() && planned == todo.len() && pending.is_empty() {
            break;
        }
        for ((index, k), generated) in engine.step()? {
            let Some(item) = index.checked_sub(first).and_then(|i| pending.get_mut(i)) else { continue };
            if item.skipped.is_some() {
                continue;
            }
            item.context_stop |= generated.stop == StopReason::Context;
            item.outputs[k] = Some(tokenizer.decode(&generated.tokens, true)?.trim().to_string());
        }
        while pending.front().is_some_and(Pending::complete) {
            let item = pending.pop_front().expect("front");
            first += 1;
            let key = task.key(&items[item.position]);
            match item.skipped {
                Some(why) => summary.skipped.push(format!("{key}: {}", why.trim())),
                None => {
                    let outputs = item.outputs.into_iter().map(|o| o.expect("complete")).collect();
                    out.append(&task.record(
                        item.position,
                        &items[item.position],
                        item.plan.expect("planned"),
                        outputs,
                    ))?;
                    summary.written += 1;
                    if item.context_stop {
                        summary.context_stops.push(key);
                    }
                }
            }
            bar.inc(1);
        }
    }
    bar.finish();
    if summary.written == 0 && summary.already_done == 0 && !summary.skipped.is_empty() {
        let shown: Vec<&str> = summary.skipped.iter().take(3).map(String::as_str).collect();
        let more = summary.skipped.len() - shown.len();
        return Err(Error::Input(format!(
            "{}: none of the {} {} could be generated, nothing was written: {}{}",
            opts.output.display(),
            summary.skipped.len(),
            opts.unit,
            shown.join("; "),
            if more > 0 { format!("; and {more} more") } else { String::new() }
        )));
    }
    out.keep();
    summary.engine = engine.stats.clone();
    summary.images_encoded = features.encoded;
    summary.images_reused = features.reused;
    Ok(summary)
}

/// Plans the item at `position` (todo index `index`) and queues its requests; an item that cannot run is
/// returned skipped.
#[allow(clippy::too_many_arguments)]
fn plan_item<T: GenerationTask>(
    session: &Session,
    task: &T,
    item: &T::Item,
    position: usize,
    index: usize,
    opts: &JobOptions,
    engine: &mut Engine<(usize, usize)>,
    features: &mut FeatureCache,
) -> Result<Pending<T::Plan>> {
    let mut pending = Pending { position, plan: None, outputs: Vec::new(), skipped: None, context_stop: false };
    let (plan, requests) = match task.plan(position, item) {
        Ok(x) => x,
        Err(why) => {
            pending.skipped = Some(why);
            return Ok(pending);
        }
    };
    pending.plan = Some(plan);
    pending.outputs = (0..requests.len()).map(|_| None).collect();
    for (k, req) in requests.iter().enumerate() {
        let (image_features, images) = match &req.image {
            Some(image) => {
                let key = ImageKey::of(image);
                let encoded = features.get_or_encode(key, || {
                    let mut encoded =
                        session.image_features(&[&crate::image::preprocess(image, &session.model.cfg.image)])?;
                    Ok(encoded.pop().expect("one image"))
                })?;
                (vec![encoded], vec![key])
            }
            None => (Vec::new(), Vec::new()),
        };
        let text = opts.template.prompt(&Session::user_text(&req.user_text, req.image.is_some()));
        let prompt = session.prepare(&text, image_features)?;
        let request = EngineRequest {
            prompt,
            images,
            row_seed: row_seed(position, k),
            max_new_tokens: opts.sampling.max_new_tokens,
        };
        match engine.submit((index, k), request) {
            Ok(()) => {}
            Err(Refusal::TooLong(e)) => {
                pending.skipped = Some(e.to_string());
                return Ok(pending);
            }
            Err(Refusal::CannotFit(e)) => return Err(e),
        }
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Items are numbers; counts how many are planned and not yet recorded.
    struct Counting {
        planned: Cell<usize>,
        recorded: Cell<usize>,
        most_in_flight: Cell<usize>,
    }

    impl GenerationTask for Counting {
        type Item = usize;
        type Plan = ();

        fn key(&self, item: &usize) -> String {
            item.to_string()
        }

        fn plan(&self, _position: usize, item: &usize) -> std::result::Result<((), Vec<Request>), String> {
            self.planned.set(self.planned.get() + 1);
            self.most_in_flight.set(self.most_in_flight.get().max(self.planned.get() - self.recorded.get()));
            Ok(((), vec![Request { user_text: format!("Count to {item}."), image: None }]))
        }

        fn record(&self, _position: usize, item: &usize, _plan: (), outputs: Vec<String>) -> serde_json::Value {
            self.recorded.set(self.recorded.get() + 1);
            serde_json::json!({"id": item, "text": outputs[0]})
        }
    }

    fn options(dir: &std::path::Path, max_new_tokens: usize) -> JobOptions<'static> {
        JobOptions {
            output: dir.join(format!("out-{max_new_tokens}.jsonl")),
            key_field: "id",
            shard: Shard::default(),
            limit: None,
            settings: serde_json::json!({"max_new_tokens": max_new_tokens}),
            sampling: SamplingConfig { max_new_tokens, ..Default::default() },
            engine: EngineOptions { slots: crate::generate::engine::BatchSize::Rows(4), ..Default::default() },
            template: Template::MistralInstruct,
            unit: "items",
            progress: false,
        }
    }

    #[test]
    fn ten_thousand_queued_items_are_prepared_a_few_at_a_time() {
        let (_model, session) = crate::generate::engine::tests::tiny_session();
        // tmpfs where there is one: each record is fsynced
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        // 10,000 prompts with no tokens to write (the queue and the window alone), then 300 that generate
        for (count, max_new_tokens) in [(10_000, 0), (300, 1)] {
            let items: Vec<usize> = (0..count).collect();
            let task = Counting { planned: Cell::new(0), recorded: Cell::new(0), most_in_flight: Cell::new(0) };
            let summary = run_job(&session, &task, &items, &options(dir.path(), max_new_tokens)).unwrap();
            assert_eq!((summary.written, task.recorded.get()), (count, count));
            assert!(task.most_in_flight.get() <= 3 * 4, "{} items prepared at once", task.most_in_flight.get());
        }
    }
}
