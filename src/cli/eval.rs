use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model_args::ModelArgs;
use stic::eval::benchmarks::{load_with_options, score, Benchmark, EvalItem, LoadOptions};
use stic::eval::judge::{JudgeClient, JudgeConfig};
use stic::eval::run::{answer_tokens, read_predictions, AnswerItems, DescribeItems};
use stic::generate::SamplingConfig;
use stic::stic::job::{run_job, JobOptions};
use stic::stic::jsonl::shard_path;
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
    fn client(&self, bench: Benchmark, cache_dir: &Path) -> Result<Option<JudgeClient>> {
        let Some(url) = &self.judge_url else { return Ok(None) };
        let default = JudgeConfig::default();
        let model = self.judge_model.as_deref().or(bench.official_judge_model()).unwrap_or(&default.model).to_string();
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
    /// scienceqa, textvqa, chartqa, llava-bench, mmbench, mm-vet or mathvista.
    #[arg(long)]
    benchmark: String,
    /// The benchmark's folder, in LLaVA-1.5's playground/data/eval layout or, for scienceqa, chartqa, mmbench and
    /// mathvista, holding their parquet release from the Hugging Face hub (the README lists the files).
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// Describe and respond: describe the image first, then answer with the description in the prompt.
    #[arg(long)]
    dar: bool,
    /// MMBench: circular evaluation (every rotation of the options).
    #[arg(long)]
    circular: bool,
    #[arg(long)]
    limit: Option<usize>,
    /// Answer only the items whose position p has p % N == I, into predictions.shard-I-of-N.jsonl (not
    /// scored). Under torchrun each rank takes shard RANK/WORLD_SIZE by itself and rank 0 joins and scores them.
    #[arg(long)]
    shard: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Default: 128 for short-answer benchmarks, 1024 for LLaVA-Bench, MM-Vet and MathVista.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Length limit of the DaR descriptions.
    #[arg(long, default_value_t = 1024)]
    description_max_new_tokens: usize,
    #[command(flatten)]
    judge: JudgeArgs,
}

fn benchmark(name: &str) -> Result<Benchmark> {
    name.parse::<Benchmark>().map_err(|_| {
        Error::Input(format!(
            "unknown benchmark '{name}' (use {})",
            Benchmark::ALL.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
        ))
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let bench = benchmark(&args.benchmark)?;
    let items = load_with_options(bench, &args.data, &LoadOptions { mmbench_circular: args.circular })?;
    let sharding = Sharding::new(args.shard.as_deref())?;
    let shard = sharding.shard();
    stic::fsutil::create_dir(&args.output)?;
    let session = args.model.load_for(&sharding)?;
    let max_pixels = session.model.cfg.image.max_pixels;
    let descriptions_path = args.output.join("descriptions.jsonl");
    let predictions_path = args.output.join("predictions.jsonl");
    let options = |path: &Path, tokens: usize| JobOptions {
        output: shard_path(path, shard),
        key_field: "id",
        shard,
        batch_size: args.batch_size,
        limit: args.limit,
        sampling: SamplingConfig { max_new_tokens: tokens, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 },
        template: Template::MistralInstruct,
        unit: "items",
        progress: sharding.is_main(),
    };
    let descriptions = if args.dar {
        let describe = DescribeItems { prompt: SticPrompts::shipped().dar_description_prompt, max_pixels };
        let opts = options(&descriptions_path, args.description_max_new_tokens);
        let summary = run_job(&session, &describe, &items, &opts)?;
        super::prefs::report(&summary, &opts.output);
        let rows: Vec<serde_json::Value> = stic::stic::jsonl::read_jsonl(&opts.output)?;
        Some(rows.iter().filter_map(|r| Some((r["id"].as_str()?.to_string(), r["description"].as_str()?.to_string()))).collect::<HashMap<_, _>>())
    } else {
        None
    };
    let answer = AnswerItems { descriptions: descriptions.as_ref(), max_pixels };
    let opts = options(&predictions_path, args.max_new_tokens.unwrap_or(answer_tokens(bench)));
    let summary = run_job(&session, &answer, &items, &opts)?;
    super::prefs::report(&summary, &opts.output);
    let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
    let mut outputs = vec![JobOutput { path: &predictions_path, key_field: "id", keys: &ids }];
    if args.dar {
        outputs.push(JobOutput { path: &descriptions_path, key_field: "id", keys: &ids });
    }
    if !sharding.finish(&outputs)? {
        if args.shard.is_some() {
            eprintln!("shard done; concatenate the shards' predictions and score them with `stic eval-score`");
        }
        return Ok(());
    }
    let limit = args.limit.unwrap_or(items.len()).min(items.len());
    let scored_items = &items[..limit];
    let written = write_summary(bench, scored_items, &predictions_path, &args.output, &args.judge)?;
    println!("{written}");
    Ok(())
}

/// Scores what can be scored and writes `summary.json`; LLaVA-Bench and MM-Vet without a judge get the files
/// their official graders read instead.
fn write_summary(bench: Benchmark, items: &[EvalItem], predictions_path: &Path, out_dir: &Path, judge: &JudgeArgs) -> Result<serde_json::Value> {
    let predictions = read_predictions(predictions_path, bench, items)?;
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
    let summary = if matches!(bench, Benchmark::LlavaBench | Benchmark::MmVet) && client.is_none() {
        let file = write_official_grader_files(bench, &answered, &predictions, out_dir)?;
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
    stic::model::tiny::write_json(&out_dir.join("summary.json"), &summary)?;
    Ok(summary)
}

fn write_official_grader_files(bench: Benchmark, items: &[EvalItem], predictions: &HashMap<String, String>, out_dir: &Path) -> Result<PathBuf> {
    let (path, text) = match bench {
        Benchmark::LlavaBench => {
            let lines: Vec<String> = items
                .iter()
                .map(|i| {
                    serde_json::json!({"question_id": i.id.parse::<i64>().map(serde_json::Value::from).unwrap_or_else(|_| i.id.clone().into()), "prompt": i.question, "text": predictions[&i.id], "answer_id": i.id, "model_id": "stic", "metadata": {}}).to_string()
                })
                .collect();
            (out_dir.join("llava_bench_answers.jsonl"), lines.join("\n") + "\n")
        }
        _ => {
            let map: serde_json::Map<String, serde_json::Value> = items.iter().map(|i| (i.id.clone(), predictions[&i.id].clone().into())).collect();
            (out_dir.join("mm-vet_results.json"), serde_json::to_string_pretty(&map).expect("json"))
        }
    };
    stic::fsutil::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[arg(long)]
    benchmark: String,
    /// JSONL of `{id, prediction}` (stic) or `{question_id, text}` (LLaVA's answer files).
    #[arg(long)]
    predictions: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    circular: bool,
    #[command(flatten)]
    judge: JudgeArgs,
}

pub fn run_score(args: ScoreArgs) -> anyhow::Result<()> {
    let bench = benchmark(&args.benchmark)?;
    let items = load_with_options(bench, &args.data, &LoadOptions { mmbench_circular: args.circular })?;
    let out_dir = args.predictions.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let summary = write_summary(bench, &items, &args.predictions, &out_dir, &args.judge)?;
    println!("{summary}");
    Ok(())
}
