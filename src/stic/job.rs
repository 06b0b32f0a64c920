//! The batched, resumable, shardable generation loop shared by `stic prefs` and `stic describe`.
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

use super::jsonl::{ResumableJsonl, Shard};
use crate::error::Result;
use crate::generate::{generate, PreparedPrompt, SamplingConfig};
use crate::session::Session;
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
    pub batch_size: usize,
    pub limit: Option<usize>,
    pub sampling: SamplingConfig,
    pub template: Template,
    pub unit: &'a str,
    /// Draw a progress bar (off on the ranks other than 0 under torchrun).
    pub progress: bool,
    /// What the records depend on (model, sampling, prompts…): a rerun into the output must have the same.
    pub settings: serde_json::Value,
}

pub struct JobSummary {
    pub written: usize,
    pub already_done: usize,
    pub skipped: Vec<String>,
}

/// Runs `task` over the items this shard owns that are not in the output yet, `batch_size` items per batch.
/// Every request of an item samples from a generator seeded by the item's position, so the output does not
/// depend on batching, sharding or resumption.
pub fn run_job<T: GenerationTask>(session: &Session, task: &T, items: &[T::Item], opts: &JobOptions) -> Result<JobSummary> {
    let mut out = ResumableJsonl::open(&opts.output, opts.key_field, &opts.settings)?;
    let limit = opts.limit.unwrap_or(items.len()).min(items.len());
    // A key listed twice (the paper's COCO list repeats 174 names) is generated once, at its first position.
    let mut seen = std::collections::HashSet::new();
    let first_listing: Vec<bool> = items[..limit].iter().map(|item| seen.insert(task.key(item))).collect();
    let repeated = first_listing.iter().filter(|&&first| !first).count();
    if repeated > 0 {
        eprintln!("{repeated} item(s) listed more than once: each is generated once");
    }
    let mine: Vec<usize> = (0..limit).filter(|&p| first_listing[p] && opts.shard.owns(p)).collect();
    let todo: Vec<usize> = mine.iter().copied().filter(|&p| !out.is_done(&task.key(&items[p]))).collect();
    let already_done = mine.len() - todo.len();
    let bar = if opts.progress { ProgressBar::new(todo.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(&format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {}, {{per_sec}}, ETA {{eta}}", opts.unit))
            .expect("template"),
    );
    bar.set_message(format!("shard {}", opts.shard));
    let mut summary = JobSummary { written: 0, already_done, skipped: Vec::new() };
    for chunk in todo.chunks(opts.batch_size.max(1)) {
        let mut planned = Vec::new();
        let mut prompts: Vec<PreparedPrompt> = Vec::new();
        let mut seeds = Vec::new();
        for &p in chunk {
            let item = &items[p];
            let (plan, requests) = match task.plan(p, item) {
                Ok(x) => x,
                Err(why) => {
                    summary.skipped.push(format!("{}: {}", task.key(item), why.trim()));
                    bar.inc(1);
                    continue;
                }
            };
            for (k, req) in requests.iter().enumerate() {
                let features = match &req.image {
                    Some(image) => session.image_features(&[&crate::image::preprocess(image, &session.model.cfg.image)])?,
                    None => Vec::new(),
                };
                let text = opts.template.prompt(&Session::user_text(&req.user_text, req.image.is_some()));
                prompts.push(session.prepare(&text, features)?);
                seeds.push(((p as u64) << 8) | k as u64);
            }
            planned.push((p, plan, requests.len()));
        }
        if prompts.is_empty() {
            continue;
        }
        let (outputs, _) = generate(&session.model, &prompts, &seeds, &opts.sampling, session.tokenizer.eos_id, session.tokenizer.pad_id)?;
        let mut texts = outputs.into_iter().map(|o| session.tokenizer.decode(&o.tokens, true).map(|t| t.trim().to_string()));
        for (p, plan, n) in planned {
            let generated = (&mut texts).take(n).collect::<Result<Vec<_>>>()?;
            out.append(&task.record(p, &items[p], plan, generated))?;
            summary.written += 1;
            bar.inc(1);
        }
    }
    bar.finish();
    out.keep();
    Ok(summary)
}
