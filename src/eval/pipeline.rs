//! `stic eval` from start to end: the run's provenance, the DaR description pass, the answers, the joining of the
//! ranks' shards and the scored `summary.json`; and `stic eval-score`, which scores a prediction file.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::benchmarks::{self, score, Answer, Benchmark, EvalItem, GraderFile, Judge, LoadOptions};
use super::dar::{self, DescribeItems, DescriptionRequest, DescriptionSetup};
use super::judge::{JudgeClient, JudgeConfig};
use super::provenance::{
    folder_fingerprint, sha256_hex, BenchmarkRun, Build, DarSettings, Generation, JudgeUsed, Provenance, Weights,
};
use super::run::{read_predictions, AnswerItems};
use crate::error::{Error, Result};
use crate::generate::engine::EngineOptions;
use crate::generate::session::{parse_dtype, ModelSpec};
use crate::generate::SamplingConfig;
use crate::jobs::job::{run_job, JobOptions};
use crate::jobs::shard::{shard_path, Shard};
use crate::jobs::sharding::{JobOutput, Sharding};
use crate::method::prefs::SticPrompts;
use crate::text::Template;

/// An OpenAI-compatible judge for LLaVA-Bench, MM-Vet (and MathVista answers the rules cannot read).
#[derive(Debug, Clone)]
pub struct JudgeSettings {
    /// API base (`…/v1`) or the full `…/chat/completions` URL.
    pub url: String,
    /// `None`: the model the benchmark's official script calls.
    pub model: Option<String>,
    /// Environment variable holding the API key.
    pub key_env: String,
    /// Independent judge runs (LLaVA-Bench only), summarised by their mean and spread.
    pub runs: u32,
}

/// What `stic eval` runs.
#[derive(Debug, Clone)]
pub struct EvalRun {
    pub model: ModelSpec,
    /// The benchmark's name ([`benchmarks::names`]).
    pub benchmark: String,
    /// The benchmark's folder.
    pub data: PathBuf,
    /// The output folder: predictions.jsonl, summary.json (and descriptions.jsonl with DaR); a rerun continues it.
    pub output: PathBuf,
    /// Conversation template of both passes.
    pub template: Template,
    /// Describe and respond: describe the image first, then answer with the description in the prompt.
    pub dar: bool,
    /// DaR descriptions written without the image.
    pub dar_image_blind: bool,
    /// The DaR description prompt; `None`: the official one.
    pub dar_prompt: Option<String>,
    /// DaR with the descriptions of this file (JSONL of `{image, description}`) instead of generated ones.
    pub descriptions: Option<PathBuf>,
    pub selection: LoadOptions,
    /// Only the first N items of the benchmark.
    pub limit: Option<usize>,
    /// "I/N": answer only the items whose position p has p % N == I (not scored).
    pub shard: Option<String>,
    pub engine: EngineOptions,
    /// `None`: the benchmark's answer length.
    pub max_new_tokens: Option<usize>,
    pub description_max_new_tokens: usize,
    /// A label for the run, recorded in summary.json.
    pub profile: Option<String>,
    pub judge: Option<JudgeSettings>,
}

/// What `stic eval-score` scores.
#[derive(Debug, Clone)]
pub struct ScoreRun {
    pub benchmark: String,
    /// JSONL of `{id, prediction}` (stic) or `{question_id, text}` (LLaVA's answer files); summary.json goes
    /// beside it.
    pub predictions: PathBuf,
    pub data: PathBuf,
    pub selection: LoadOptions,
    pub judge: Option<JudgeSettings>,
}

/// How [`evaluate`] ended in this process.
#[derive(Debug)]
pub enum Evaluated {
    /// The whole benchmark is answered and scored: the summary written to summary.json.
    Scored(serde_json::Value),
    /// This process answered its shard; another one joins and scores the shards.
    ShardAnswered,
}

fn benchmark(name: &str) -> Result<&'static dyn Benchmark> {
    benchmarks::find(name)
        .map_err(|_| Error::Input(format!("unknown benchmark '{name}' (use {})", benchmarks::names().join(", "))))
}

/// The binary's version and the commit `make build` passes in `STIC_GIT_COMMIT` (none from a plain `cargo build`).
const BUILD: Build = Build {
    version: env!("CARGO_PKG_VERSION"),
    git_commit: match option_env!("STIC_GIT_COMMIT") {
        Some(commit) if !commit.is_empty() => Some(commit),
        _ => None,
    },
};

fn dtype_name(kind: tch::Kind) -> String {
    match kind {
        tch::Kind::Float => "f32".into(),
        tch::Kind::BFloat16 => "bf16".into(),
        tch::Kind::Half => "f16".into(),
        other => format!("{other:?}"),
    }
}

/// Answers the benchmark's questions (describing the images first with DaR) into the output folder, resuming
/// what is there, and scores them into `summary.json` once every shard is answered.
pub fn evaluate(run: &EvalRun) -> Result<Evaluated> {
    let bench = benchmark(&run.benchmark)?;
    check_judge_runs(bench, run.judge.as_ref())?;
    let template = run.template;
    run.model.check_output("--output", &run.output, &[])?;
    let items = bench.load(&run.data, &run.selection)?;
    let sharding = Sharding::new(run.shard.as_deref())?;
    let shard = sharding.shard();
    let device = sharding.device(run.model.device()?);
    let dtype = dtype_name(parse_dtype(&run.model.dtype, device)?);
    let description_prompt = match &run.dar_prompt {
        Some(prompt) if prompt.trim().is_empty() => {
            return Err(Error::Input("--dar-prompt is empty: give the description prompt's text".into()))
        }
        Some(prompt) => prompt.clone(),
        None => SticPrompts::shipped().dar_description_prompt,
    };
    let max_new_tokens = run.max_new_tokens.unwrap_or(bench.protocol().answer_tokens);
    let limit = run.limit.unwrap_or(items.len()).min(items.len());
    let description_file =
        run.descriptions.as_deref().map(|path| dar::read_description_file(path, &items[..limit])).transpose()?;
    let provenance = Provenance {
        stic: BUILD,
        benchmark: benchmark_run(bench, &run.data, &run.selection),
        predictions_sha256: String::new(),
        model: Some(Weights::of(run.model.model.folder("eval")?, "config.json")?),
        adapter: run.model.adapter.as_deref().map(|dir| Weights::of(dir, "adapter_config.json")).transpose()?,
        template: Some(template.name()),
        profile: run.profile.clone(),
        generation: Some(Generation {
            dtype: dtype.clone(),
            max_new_tokens,
            temperature: 0.0,
            dar: run.dar.then(|| DarSettings {
                description_prompt: description_prompt.clone(),
                description_max_new_tokens: run.description_max_new_tokens,
                image_blind: run.dar_image_blind,
            }),
            descriptions_sha256: description_file.as_ref().map(|file| file.sha256.clone()),
        }),
        judge: None,
    };
    let setup = DescriptionSetup {
        model: folder_fingerprint(run.model.model.folder("eval")?)?,
        adapter: run.model.adapter.as_deref().map(folder_fingerprint).transpose()?,
        prompt: description_prompt.clone(),
        template: template.name(),
        max_new_tokens: run.description_max_new_tokens,
        dtype,
        image_blind: run.dar_image_blind,
    };
    crate::fsutil::create_dir(&run.output)?;
    check_settings(&run.output, &provenance, &setup)?;
    let session = sharding.load(&run.model)?;
    let max_pixels = session.model.cfg.image.max_pixels;
    let descriptions_path = run.output.join("descriptions.jsonl");
    let predictions_path = run.output.join("predictions.jsonl");
    // The output folder's settings guard (check_settings) covers the data and the selection; each job's own
    // guard covers what it generates with.
    let task = serde_json::json!({
        "task": "eval", "benchmark": bench.name(), "template": template.name(), "dar_image_blind": run.dar_image_blind,
    });
    let options = |path: &Path, key_field, shard, tokens| {
        let sampling = SamplingConfig { max_new_tokens: tokens, ..SamplingConfig::default() };
        JobOptions {
            output: shard_path(path, sharding.shard()),
            key_field,
            shard,
            limit: Some(limit),
            settings: run.model.job_settings(&sampling, task.clone()),
            sampling,
            engine: run.engine.clone(),
            template,
            unit: "items",
            progress: sharding.is_main(),
        }
    };
    let requests = if run.dar { setup.requests(&items[..limit]) } else { Vec::new() };
    let descriptions = if run.dar {
        // This shard describes the images of its own items (a description two shards need is made by both).
        let mine: Vec<DescriptionRequest> = requests.iter().filter(|r| shard.owns(r.position)).cloned().collect();
        let describe = DescribeItems::new(description_prompt, max_pixels);
        let opts = options(&descriptions_path, dar::KEY_FIELD, Shard::default(), run.description_max_new_tokens);
        run_job(&session, &describe, &mine, &opts)?.report(&opts.output);
        Some(dar::by_item(&requests, &dar::read_descriptions(&opts.output)?))
    } else {
        description_file.map(|file| file.by_item)
    };
    let answer = AnswerItems { descriptions: descriptions.as_ref(), max_pixels };
    let opts = options(&predictions_path, "id", shard, max_new_tokens);
    run_job(&session, &answer, &items, &opts)?.report(&opts.output);
    let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
    let outputs = [JobOutput { path: &predictions_path, key_field: "id", keys: &ids }];
    if !sharding.finish(&outputs)? {
        return Ok(Evaluated::ShardAnswered);
    }
    if run.dar && shard.count() > 1 {
        let n = dar::join_rank_files(&descriptions_path, shard.count(), &requests)?;
        eprintln!("{}: {n} records joined from {} ranks", descriptions_path.display(), shard.count());
    }
    let summary =
        write_summary(bench, &items[..limit], &predictions_path, &run.output, run.judge.as_ref(), provenance)?;
    Ok(Evaluated::Scored(summary))
}

/// Scores a prediction file of the benchmark into `summary.json` beside it; returns the summary.
pub fn score_predictions(run: &ScoreRun) -> Result<serde_json::Value> {
    let bench = benchmark(&run.benchmark)?;
    check_judge_runs(bench, run.judge.as_ref())?;
    let items = bench.load(&run.data, &run.selection)?;
    let out_dir = run.predictions.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let provenance = Provenance {
        stic: BUILD,
        benchmark: benchmark_run(bench, &run.data, &run.selection),
        predictions_sha256: String::new(),
        model: None,
        adapter: None,
        template: None,
        profile: None,
        generation: None,
        judge: None,
    };
    write_summary(bench, &items, &run.predictions, &out_dir, run.judge.as_ref(), provenance)
}

fn benchmark_run(bench: &dyn Benchmark, data: &Path, selection: &LoadOptions) -> BenchmarkRun {
    BenchmarkRun {
        name: bench.name(),
        data: data.display().to_string(),
        circular: selection.mmbench_circular,
        with_text_only: selection.with_text_only,
        mmbench_options: selection.mmbench_options,
    }
}

/// Refuses several judge runs for a benchmark whose review is not repeated, before anything is answered.
fn check_judge_runs(bench: &dyn Benchmark, judge: Option<&JudgeSettings>) -> Result<()> {
    match judge {
        Some(settings) if settings.runs > 1 && !bench.repeats_judge_review() => Err(Error::Input(format!(
            "--judge-runs {}: {} is not reviewed in repeated judge runs (only llava-bench is); leave --judge-runs \
             at 1",
            settings.runs,
            bench.name()
        ))),
        _ => Ok(()),
    }
}

/// The judge client of `settings`, caching its replies in `cache_dir`.
fn judge_client(settings: &JudgeSettings, bench: &dyn Benchmark, cache_dir: &Path) -> Result<JudgeClient> {
    let default = JudgeConfig::default();
    let model =
        settings.model.as_deref().or(bench.protocol().judge.official_model()).unwrap_or(&default.model).to_string();
    let cfg = JudgeConfig {
        url: settings.url.clone(),
        model,
        api_key_env: settings.key_env.clone(),
        cache_path: Some(cache_dir.join("judge_cache.jsonl")),
        timeout: Duration::from_secs(120),
        runs: settings.runs,
        ..default
    };
    JudgeClient::new(cfg).map_err(|e| Error::Input(format!("judge: {e}")))
}

/// The output folder resumes: its predictions must come from the settings of this run, or summary.json would
/// say what did not produce them. `eval_settings.json` keeps the first run's: the provenance's settings and the
/// fingerprints of the model and adapter files (an adapter retrained in place changes them).
fn check_settings(out_dir: &Path, provenance: &Provenance, setup: &DescriptionSetup) -> Result<()> {
    let path = out_dir.join("eval_settings.json");
    let mut settings = serde_json::to_value(provenance).expect("provenance serialises");
    let settings = settings.as_object_mut().expect("an object");
    for varies in ["stic", "predictions_sha256", "profile", "judge"] {
        settings.remove(varies);
    }
    settings.insert("model_files".into(), setup.model.clone().into());
    settings.insert("adapter_files".into(), setup.adapter.clone().into());
    let settings = serde_json::Value::Object(settings.clone());
    if !path.exists() {
        return crate::model::tiny::write_json(&path, &settings);
    }
    let before: serde_json::Value = crate::fsutil::read_json(&path)?;
    if before == settings {
        return Ok(());
    }
    Err(Error::Input(format!(
        "{} holds predictions made with other settings ({}; see {}): use another --output, or delete \
         its predictions, descriptions and eval_settings.json to start over",
        out_dir.display(),
        crate::settings::differences(&before, &settings).join(", "),
        path.display()
    )))
}

/// Scores what can be scored and writes `summary.json` with the run's provenance; LLaVA-Bench and MM-Vet
/// without a judge get the files their official graders read instead.
fn write_summary(
    bench: &dyn Benchmark,
    items: &[EvalItem],
    predictions_path: &Path,
    out_dir: &Path,
    judge: Option<&JudgeSettings>,
    mut provenance: Provenance,
) -> Result<serde_json::Value> {
    let predictions = read_predictions(predictions_path, bench, items)?;
    let bytes = std::fs::read(predictions_path).map_err(|e| Error::io(predictions_path, e))?;
    provenance.predictions_sha256 = sha256_hex(&bytes);
    let answered: Vec<EvalItem> = items.iter().filter(|i| predictions.contains_key(&i.id)).cloned().collect();
    let known: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let unmatched: Vec<&String> = predictions.keys().filter(|id| !known.contains(id.as_str())).collect();
    if !unmatched.is_empty() {
        eprintln!(
            "warning: {} prediction(s) match no {} item (e.g. {:?}); they are not scored",
            unmatched.len(),
            bench.name(),
            unmatched.iter().take(3).collect::<Vec<_>>()
        );
    }
    let client = judge.map(|settings| judge_client(settings, bench, out_dir)).transpose()?;
    provenance.judge =
        client.as_ref().map(|c| JudgeUsed { model: c.config().model.clone(), url: c.config().url.clone() });
    let grader_file = match bench.protocol().judge {
        Judge::Required(_) if client.is_none() => official_grader_file(bench, items, &predictions)?,
        _ => None,
    };
    let mut summary = if let Some(grader_file) = grader_file {
        let file = out_dir.join(grader_file.name);
        crate::fsutil::write_atomic(&file, grader_file.contents.as_bytes())?;
        serde_json::json!({
            "benchmark": bench.name(),
            "answered": answered.len(),
            "items": items.len(),
            "score": null,
            "note": format!("{} is graded by an LLM judge: pass --judge-url to grade here, or give {} to the official grader", bench.name(), file.display()),
        })
    } else {
        let s = score(bench, items, &predictions, client.as_ref())?;
        let mut v = serde_json::to_value(&s).expect("score serialises");
        v["benchmark"] = bench.name().into();
        v["answered"] = answered.len().into();
        v["items"] = items.len().into();
        v["unmatched_predictions"] = unmatched.len().into();
        if let Some(c) = &client {
            v["judge"] = serde_json::to_value(c.stats()).expect("stats serialise");
        }
        v
    };
    summary["provenance"] = serde_json::to_value(&provenance).expect("provenance serialises");
    crate::model::tiny::write_json(&out_dir.join("summary.json"), &summary)?;
    Ok(summary)
}

/// The file the benchmark's official grader reads, which needs an answer for every question: LLaVA's reviewer
/// pairs `questions.jsonl` with the answer file line by line (a missing line would shift every later answer
/// onto the wrong question), MM-Vet's grader looks every question up.
fn official_grader_file(
    bench: &dyn Benchmark,
    items: &[EvalItem],
    predictions: &HashMap<String, String>,
) -> Result<Option<GraderFile>> {
    let missing: Vec<&str> = items.iter().filter(|i| !predictions.contains_key(&i.id)).map(|i| i.id.as_str()).collect();
    if !missing.is_empty() {
        let shown = missing.iter().take(10).copied().collect::<Vec<_>>().join(", ");
        let more = if missing.len() > 10 { format!(" and {} more", missing.len() - 10) } else { String::new() };
        return Err(Error::Input(format!(
            "{}: {} of {} questions have no prediction (ids {shown}{more}); the official grader needs an answer for \
             every question in order, so its file is not written. Rerun `stic eval` to answer the missing ones, or \
             pass --judge-url to grade the answered ones here",
            bench.name(),
            missing.len(),
            items.len()
        )));
    }
    let answers: Vec<Answer> = items.iter().map(|item| Answer { item, prediction: &predictions[&item.id] }).collect();
    Ok(bench.grader_file(&answers))
}
