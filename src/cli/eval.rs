use std::path::PathBuf;

use super::model_args::ModelArgs;
use stic::eval::benchmarks::{LoadOptions, MmBenchOptions};
use stic::eval::pipeline::{evaluate, score_predictions, EvalRun, Evaluated, JudgeSettings, ScoreRun};

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
    /// LLaVA-Bench: review every answer in K independent judge runs (each its own requests, cached apart);
    /// summary.json gives the mean over the runs and their spread (std, min, max) per category.
    #[arg(long, value_name = "K", default_value_t = 1, requires = "judge_url",
          value_parser = clap::value_parser!(u32).range(1..))]
    judge_runs: u32,
}

impl JudgeArgs {
    fn settings(&self) -> Option<JudgeSettings> {
        let url = self.judge_url.clone()?;
        Some(JudgeSettings {
            url,
            model: self.judge_model.clone(),
            key_env: self.judge_key_env.clone(),
            runs: self.judge_runs,
        })
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
    /// DaR: the description prompt (the paper's Table 9 compares prompts). Default: the official
    /// `model_vqa_mmbench_dar.py` one, "Detail the composition and subjects within the frame."
    #[arg(long, value_name = "TEXT", requires = "dar")]
    dar_prompt: Option<String>,
    /// DaR with the descriptions of FILE instead of generating them, as the paper's DaR on the benchmarks other
    /// than MMBench: JSONL of `{"image": …, "description": …}` (what `stic describe` writes), matched to each
    /// question by its image path; every question with an image needs one.
    #[arg(long, value_name = "FILE", conflicts_with = "dar")]
    descriptions: Option<PathBuf>,
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
    engine: super::job_args::EngineArgs,
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
    /// MMBench: the options each prompt lists: every option the scorer reads, or LLaVA's `get_options` (A to D,
    /// up to the first that reads "none" or "nan"); summary.json's `options_cut` counts the questions it cuts.
    #[arg(long, default_value = "all", value_parser = super::choices::value_enum::<MmBenchOptions>())]
    mmbench_options: MmBenchOptions,
}

impl SelectionArgs {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            mmbench_circular: self.circular,
            with_text_only: self.with_text_only,
            mmbench_options: self.mmbench_options,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let run = EvalRun {
        model: args.model.spec(0),
        benchmark: args.benchmark,
        data: args.data,
        output: args.output,
        template: args.template.parse()?,
        dar: args.dar,
        dar_image_blind: args.dar_image_blind,
        dar_prompt: args.dar_prompt,
        descriptions: args.descriptions,
        selection: args.selection.load_options(),
        limit: args.limit,
        shard: args.shard,
        engine: args.engine.options(),
        max_new_tokens: args.max_new_tokens,
        description_max_new_tokens: args.description_max_new_tokens,
        profile: args.profile,
        judge: args.judge.settings(),
    };
    match evaluate(&run)? {
        Evaluated::Scored(summary) => println!("{summary}"),
        Evaluated::ShardAnswered if run.shard.is_some() => {
            eprintln!("shard done; concatenate the shards' predictions and score them with `stic eval-score`")
        }
        Evaluated::ShardAnswered => {}
    }
    Ok(())
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
    let run = ScoreRun {
        benchmark: args.benchmark,
        predictions: args.predictions,
        data: args.data,
        selection: args.selection.load_options(),
        judge: args.judge.settings(),
    };
    println!("{}", score_predictions(&run)?);
    Ok(())
}
