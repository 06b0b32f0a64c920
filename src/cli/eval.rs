use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model_args::ModelArgs;
use stic::eval::benchmarks::{self, score, Answer, Benchmark, EvalItem, GraderFile, Judge, LoadOptions};
use stic::eval::judge::{JudgeClient, JudgeConfig};
use stic::eval::dar::{self, DescribeItems, DescriptionRequest, DescriptionSetup};
use stic::eval::provenance::{
    folder_fingerprint, sha256_hex, BenchmarkRun, Build, DarSettings, Generation, JudgeUsed, Provenance, Weights,
};
use stic::eval::run::{read_predictions, AnswerItems};
use stic::generate::SamplingConfig;
use stic::stic::job::{run_job, JobOptions};
use stic::session::{parse_device, parse_dtype};
use stic::stic::jsonl::{shard_path, Shard};
use stic::stic::prefs::SticPrompts;
use stic::stic::sharding::{JobOutput, Sharding};
use stic::text::Template;
use stic::{Error, Result};

/// An OpenAI-compatible judge for LLaVA-Bench, MM-Vet (and MathVista answers the rules cannot read).
#[derive(clap::Args)]
pub struct JudgeArgs {
    /// API base (`…/v1`) or the full `…/chat/completions` URL.
    #[arg(long)]
    judge_url: Option<String>,
    /// Default: the model the benchmark's official script calls (LLaVA-Bench gpt-4-0314, MM-Vet and MathVista
    /// gpt-4-0613).
    #[arg(long)]
    judge_model: Option<String>,
    /// Environment variable holding the API key.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    judge_key_env: String,
}

impl JudgeArgs {
    fn client(&self, bench: &dyn Benchmark, cache_dir: &Path) -> Result<Option<JudgeClient>> {
        let Some(url) = &self.judge_url else { return Ok(None) };
        let default = JudgeConfig::default();
        let model = self.judge_model.as_deref().or(bench.protocol().judge.official_model()).unwrap_or(&default.model).to_string();
        let cfg = JudgeConfig {
            url: url.clone(),
            model,
            api_key_env: self.judge_key_env.clone(),
            cache_path: Some(cache_dir.join("judge_cache.jsonl")),
            timeout: Duration::from_secs(120),
            ..default
        };
        JudgeClient::new(cfg).map(Some).map_err(|e| Error::Input(format!("judge: {e}")))
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The benchmark to answer and score.
    #[arg(long, value_parser = super::choices::benchmark(), ignore_case = true)]
    benchmark: String,
    /// The benchmark's folder, in LLaVA-1.5's playground/data/eval layout or, for scienceqa, chartqa, mmbench and
    /// mathvista, holding their parquet release from the Hugging Face hub (the README lists the files).
    #[arg(long)]
    data: PathBuf,
    /// Output folder: predictions.jsonl, summary.json (and descriptions.jsonl with --dar); a rerun continues it.
    #[arg(long)]
    output: PathBuf,
    /// Conversation template of both passes (vicuna_v1 is what every official eval script passes as
    /// `--conv-mode`).
    #[arg(long, default_value = "mistral_instruct", value_parser = super::choices::template())]
    template: String,
    /// Describe and respond: describe the image first, then answer with the description in the prompt.
    #[arg(long)]
    dar: bool,
    /// DaR: write the description without the image, as the official model_vqa_mmbench_dar.py does (its
    /// description prompt has no `<image>`); every question then gets the same description.
    #[arg(long, requires = "dar")]
    dar_image_blind: bool,
    #[command(flatten)]
    selection: SelectionArgs,
    /// Only the first N items of the benchmark.
    #[arg(long)]
    limit: Option<usize>,
    /// Answer only the items whose position p has p % N == I, into predictions.shard-I-of-N.jsonl (not
    /// scored). Under torchrun each rank takes shard RANK/WORLD_SIZE by itself and rank 0 joins and scores them.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    #[command(flatten)]
    engine: super::prefs::EngineArgs,
    /// Default: 128 for the short-answer benchmarks (scienceqa, textvqa, chartqa, mmbench), 1024 for llava-bench,
    /// mm-vet and mathvista. The official scripts allow 1024 everywhere: pass 1024 to match them.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Length limit of the DaR descriptions (the official one).
    #[arg(long, default_value_t = 1024)]
    description_max_new_tokens: usize,
    /// A label for the run, recorded in summary.json (`stic reproduce` passes its profile).
    #[arg(long)]
    profile: Option<String>,
    #[command(flatten)]
    judge: JudgeArgs,
}

/// Which items of the benchmark are evaluated.
#[derive(clap::Args)]
struct SelectionArgs {
    /// MMBench: circular evaluation (every rotation of the options).
    #[arg(long)]
    circular: bool,
    /// ScienceQA: also answer the text-only questions (their prompt has no `<image>`), as the official run of
    /// llava_test_CQM-A.json does; summary.json has Accuracy over all and `img_accuracy` either way.
    #[arg(long)]
    with_text_only: bool,
}

impl SelectionArgs {
    fn load_options(&self) -> LoadOptions {
        LoadOptions { mmbench_circular: self.circular, with_text_only: self.with_text_only }
    }
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

pub fn run(args: Args) -> anyhow::Result<()> {
    let bench = benchmark(&args.benchmark)?;
    let template: Template = args.template.parse()?;
    args.model.check_output("--output", &args.output, &[])?;
    let items = bench.load(&args.data, &args.selection.load_options())?;
    let sharding = Sharding::new(args.shard.as_deref())?;
    let shard = sharding.shard();
    let device = sharding.device(parse_device(&args.model.device)?);
    let dtype = dtype_name(parse_dtype(&args.model.dtype, device)?);
    let description_prompt = SticPrompts::shipped().dar_description_prompt;
    let max_new_tokens = args.max_new_tokens.unwrap_or(bench.protocol().answer_tokens);
    let provenance = Provenance {
        stic: BUILD,
        benchmark: benchmark_run(bench, &args.data, &args.selection),
        predictions_sha256: String::new(),
        model: Some(Weights::of(&args.model.model, "config.json")?),
        adapter: args.model.adapter.as_deref().map(|dir| Weights::of(dir, "adapter_config.json")).transpose()?,
        template: Some(template.name()),
        profile: args.profile.clone(),
        generation: Some(Generation {
            dtype: dtype.clone(),
            max_new_tokens,
            temperature: 0.0,
            dar: args.dar.then(|| DarSettings {
                description_prompt: description_prompt.clone(),
                description_max_new_tokens: args.description_max_new_tokens,
                image_blind: args.dar_image_blind,
            }),
        }),
        judge: None,
    };
    let setup = DescriptionSetup {
        model: folder_fingerprint(&args.model.model)?,
        adapter: args.model.adapter.as_deref().map(folder_fingerprint).transpose()?,
        prompt: description_prompt.clone(),
        template: template.name(),
        max_new_tokens: args.description_max_new_tokens,
        dtype,
        image_blind: args.dar_image_blind,
    };
    stic::fsutil::create_dir(&args.output)?;
    check_settings(&args.output, &provenance, &setup)?;
    let session = args.model.load_for(&sharding)?;
    let max_pixels = session.model.cfg.image.max_pixels;
    let descriptions_path = args.output.join("descriptions.jsonl");
    let predictions_path = args.output.join("predictions.jsonl");
    let limit = args.limit.unwrap_or(items.len()).min(items.len());
    // The output folder's settings guard (check_settings) covers the data and the selection; each job's own
    // guard covers what it generates with.
    let task = serde_json::json!({
        "task": "eval", "benchmark": bench.name(), "template": template.name(), "dar_image_blind": args.dar_image_blind,
    });
    let options = |path: &Path, key_field, shard, tokens| {
        let sampling = SamplingConfig { max_new_tokens: tokens, ..SamplingConfig::default() };
        JobOptions {
            output: shard_path(path, sharding.shard()),
            key_field,
            shard,
            limit: Some(limit),
            settings: args.model.job_settings(&sampling, task.clone()),
            sampling,
            engine: args.engine.options(),
            template,
            unit: "items",
            progress: sharding.is_main(),
        }
    };
    let requests = if args.dar { setup.requests(&items[..limit]) } else { Vec::new() };
    let descriptions = if args.dar {
        // This shard describes the images of its own items (a description two shards need is made by both).
        let mine: Vec<DescriptionRequest> = requests.iter().filter(|r| shard.owns(r.position)).cloned().collect();
        let describe = DescribeItems::new(description_prompt, max_pixels);
        let opts = options(&descriptions_path, dar::KEY_FIELD, Shard::default(), args.description_max_new_tokens);
        let summary = run_job(&session, &describe, &mine, &opts)?;
        super::prefs::report(&summary, &opts.output);
        Some(dar::by_item(&requests, &dar::read_descriptions(&opts.output)?))
    } else {
        None
    };
    let answer = AnswerItems { descriptions: descriptions.as_ref(), max_pixels };
    let opts = options(&predictions_path, "id", shard, max_new_tokens);
    let summary = run_job(&session, &answer, &items, &opts)?;
    super::prefs::report(&summary, &opts.output);
    let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
    let outputs = [JobOutput { path: &predictions_path, key_field: "id", keys: &ids }];
    if !sharding.finish(&outputs)? {
        if args.shard.is_some() {
            eprintln!("shard done; concatenate the shards' predictions and score them with `stic eval-score`");
        }
        return Ok(());
    }
    if args.dar && shard.count() > 1 {
        let n = dar::join_rank_files(&descriptions_path, shard.count(), &requests)?;
        eprintln!("{}: {n} records joined from {} ranks", descriptions_path.display(), shard.count());
    }
    let written = write_summary(bench, &items[..limit], &predictions_path, &args.output, &args.judge, provenance)?;
    println!("{written}");
    Ok(())
}

fn benchmark_run(bench: &dyn Benchmark, data: &Path, selection: &SelectionArgs) -> BenchmarkRun {
    BenchmarkRun {
        name: bench.name(),
        data: data.display().to_string(),
        circular: selection.circular,
        with_text_only: selection.with_text_only,
    }
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
        return stic::model::tiny::write_json(&path, &settings);
    }
    let before: serde_json::Value = stic::error::read_json(&path)?;
    if before == settings {
        return Ok(());
    }
    Err(Error::Input(format!(
        "{} holds predictions made with other settings ({}; see {}): use another --output, or delete \
         its predictions, descriptions and eval_settings.json to start over",
        out_dir.display(),
        stic::settings::differences(&before, &settings).join(", "),
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
    judge: &JudgeArgs,
    mut provenance: Provenance,
) -> Result<serde_json::Value> {
    let predictions = read_predictions(predictions_path, bench, items)?;
    let bytes = std::fs::read(predictions_path).map_err(|e| Error::io(predictions_path, e))?;
    provenance.predictions_sha256 = sha256_hex(&bytes);
    let answered: Vec<EvalItem> = items.iter().filter(|i| predictions.contains_key(&i.id)).cloned().collect();
    let known: std::collections::HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let unmatched: Vec<&String> = predictions.keys().filter(|id| !known.contains(id.as_str())).collect();
    if !unmatched.is_empty() {
        eprintln!(
            "warning: {} prediction(s) match no {} item (e.g. {:?}); they are not scored",
            unmatched.len(),
            bench.name(),
            unmatched.iter().take(3).collect::<Vec<_>>()
        );
    }
    let client = judge.client(bench, out_dir)?;
    provenance.judge = client.as_ref().map(|c| JudgeUsed { model: c.config().model.clone(), url: c.config().url.clone() });
    let grader_file = match bench.protocol().judge {
        Judge::Required(_) if client.is_none() => official_grader_file(bench, items, &predictions)?,
        _ => None,
    };
    let summary = if let Some(grader_file) = grader_file {
        let file = out_dir.join(grader_file.name);
        stic::fsutil::write_atomic(&file, grader_file.contents.as_bytes())?;
        serde_json::json!({
            "benchmark": bench.name(),
            "answered": answered.len(),
            "items": items.len(),
            "score": null,
            "note": format!("{} is graded by an LLM judge: pass --judge-url to grade here, or give {} to the official grader", bench.name(), file.display()),
        })
    } else {
        let s = score(bench, &answered, &predictions, client.as_ref())?;
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
    let mut summary = summary;
    summary["provenance"] = serde_json::to_value(&provenance).expect("provenance serialises");
    stic::model::tiny::write_json(&out_dir.join("summary.json"), &summary)?;
    Ok(summary)
}

/// The file the benchmark's official grader reads, which needs an answer for every question: LLaVA's reviewer
/// pairs `questions.jsonl` with the answer file line by line (a missing line would shift every later answer
/// onto the wrong question), MM-Vet's grader looks every question up.
fn official_grader_file(bench: &dyn Benchmark, items: &[EvalItem], predictions: &HashMap<String, String>) -> Result<Option<GraderFile>> {
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

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// The benchmark the predictions answer.
    #[arg(long, value_parser = super::choices::benchmark(), ignore_case = true)]
    benchmark: String,
    /// JSONL of `{id, prediction}` (stic) or `{question_id, text}` (LLaVA's answer files).
    #[arg(long)]
    predictions: PathBuf,
    /// The benchmark's folder (as for `stic eval --data`).
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    selection: SelectionArgs,
    #[command(flatten)]
    judge: JudgeArgs,
}

pub fn run_score(args: ScoreArgs) -> anyhow::Result<()> {
    let bench = benchmark(&args.benchmark)?;
    let items = bench.load(&args.data, &args.selection.load_options())?;
    let out_dir = args.predictions.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let provenance = Provenance {
        stic: BUILD,
        benchmark: benchmark_run(bench, &args.data, &args.selection),
        predictions_sha256: String::new(),
        model: None,
        adapter: None,
        template: None,
        profile: None,
        generation: None,
        judge: None,
    };
    let summary = write_summary(bench, &items, &args.predictions, &out_dir, &args.judge, provenance)?;
    println!("{summary}");
    Ok(())
}
