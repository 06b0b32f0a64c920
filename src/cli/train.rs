use std::path::PathBuf;

use stic::train::config::Overrides;
use stic::train::dpo::{LossType, RejectedScoring};
use stic::train::setup::{DpoRun, TrainRun};
use stic::train::tracking::ReportTo;

/// Flags shared by `train-dpo` and `train-sft`; they override the YAML config.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Base model folder, or its hub id in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_args::hub_path, required_unless_present = "random_weights")]
    model: Option<PathBuf>,
    /// Instead of --model: this geometry with random weights made on the device from the seed, nothing read or
    /// written; the shipped Mistral tokenizer (throughput checks).
    #[arg(long, value_name = "GEOMETRY", hide = true, conflicts_with = "model")]
    random_weights: Option<stic::model::geometry::Geometry>,
    #[command(flatten)]
    processing: super::model_args::ProcessingArg,
    /// Training data: preference pairs JSONL (`stic prefs`) for train-dpo, LLaVA-format conversations for
    /// train-sft.
    #[arg(long)]
    data: PathBuf,
    /// Folder of the images the records name.
    #[arg(long)]
    image_dir: PathBuf,
    /// Folder for the adapter, its checkpoints and train_log.csv.
    #[arg(long)]
    output: PathBuf,
    /// YAML settings (default: the shipped configs/paper/stage1.yaml or stage2.yaml); flags override them.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start from this adapter (a folder or its hub id) instead of a fresh one (stage 2 starts from the
    /// stage-1 adapter).
    #[arg(long, value_parser = super::model_args::hub_path)]
    init_adapter: Option<PathBuf>,
    /// Stop after this many optimizer steps. Default: as many as --epochs take.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<f64>,
    /// Learning rate of the LoRA weights (cosine schedule after the warmup).
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate of the projector, trained in full.
    #[arg(long)]
    projector_lr: Option<f64>,
    /// LoRA rank.
    #[arg(long)]
    lora_r: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Dropout on the LoRA input.
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Examples per micro-batch on each rank.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Longest row in tokens (image features included); longer responses are cut.
    #[arg(long)]
    max_length: Option<usize>,
    /// Write a checkpoint every N optimizer steps.
    #[arg(long)]
    save_steps: Option<usize>,
    /// Seed of the LoRA initialisation, the shuffling and the dropout.
    #[arg(long)]
    seed: Option<u64>,
    /// cpu, cuda, cuda:N or auto (CUDA when there is a GPU).
    #[arg(long, value_parser = super::choices::device)]
    device: Option<String>,
    /// Weights' dtype; auto is bf16 on CUDA, f32 on CPU.
    #[arg(long, value_parser = super::choices::dtype())]
    dtype: Option<String>,
    /// Recompute decoder layers in backward instead of keeping activations (true/false).
    #[arg(long)]
    gradient_checkpointing: Option<bool>,
    /// Continue from the latest checkpoint in --output.
    #[arg(long)]
    resume: bool,
    /// Skip malformed records (reported) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Where the scalars go besides train_log.csv and trainer_state.json [default: tensorboard, or report_to of
    /// the config].
    #[arg(long, value_enum)]
    report_to: Option<ReportTo>,
    /// Folder of the TensorBoard event files [default: OUTPUT/runs].
    #[arg(long)]
    logging_dir: Option<PathBuf>,
    /// Steps whose metrics one log row averages [default: 1, or logging_steps of the config].
    #[arg(long)]
    logging_steps: Option<usize>,
    /// Held-out data in the format of --data, evaluated every --eval-steps and at the end.
    #[arg(long, conflicts_with = "val_fraction")]
    eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data (chosen by --seed) and evaluate on it instead of training on it.
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Steps between evaluations [default: the save steps, or eval_steps of the config].
    #[arg(long)]
    eval_steps: Option<usize>,
    /// JSON lines {"image": name or path under --image-dir, "prompt": text}: greedy answers to them go to
    /// OUTPUT/samples.jsonl every --sample-every steps and at the end.
    #[arg(long)]
    sample_prompts: Option<PathBuf>,
    /// Steps between samples [default: the eval steps].
    #[arg(long, requires = "sample_prompts")]
    sample_every: Option<usize>,
    /// Tokens each sample answer may have.
    #[arg(long, default_value_t = 64)]
    sample_max_new_tokens: usize,
    #[command(flatten)]
    json_summary: super::summary::SummaryArgs,
    /// Stop after this many optimizer steps, as if interrupted (tests resume with it).
    #[arg(long, hide = true)]
    stop_after_steps: Option<usize>,
    /// Write the loss, the padded batch and the LoRA gradients of the first micro-batch to this safetensors file
    /// and exit.
    #[arg(long, hide = true)]
    dump_first_step: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct DpoArgs {
    #[command(flatten)]
    common: TrainArgs,
    /// DPO's beta: how far the policy may move from the reference.
    #[arg(long)]
    beta: Option<f64>,
    /// Weight of the chosen response's log-likelihood term.
    #[arg(long)]
    alpha: Option<f64>,
    /// The DPO loss.
    #[arg(long, value_parser = super::choices::value_enum::<LossType>())]
    loss_type: Option<LossType>,
    /// How the rejected response is scored: paper (its log-probability) or official_top_token (the official
    /// code's quirk).
    #[arg(long, value_parser = super::choices::value_enum::<RejectedScoring>())]
    rejected_scoring: Option<RejectedScoring>,
    /// Compute the reference log-probs of every pair once before training.
    #[arg(long)]
    precompute_reference: bool,
    /// Run each row's prompt on its own instead of once per pair (slower, the same numbers; for comparison).
    #[arg(long)]
    no_shared_prefix: bool,
}

#[derive(clap::Args)]
pub struct SftArgs {
    #[command(flatten)]
    common: TrainArgs,
}

impl TrainArgs {
    /// The run these flags describe; `dpo` holds the objective's overrides.
    fn run(&self, dpo: Overrides) -> TrainRun {
        TrainRun {
            model: self.model.clone(),
            random_weights: self.random_weights,
            processing: self.processing.processing,
            data: self.data.clone(),
            image_dir: self.image_dir.clone(),
            output: self.output.clone(),
            config: self.config.clone(),
            overrides: Overrides {
                lr: self.lr,
                projector_lr: self.projector_lr,
                epochs: self.epochs,
                max_steps: self.max_steps,
                lora_r: self.lora_r,
                lora_alpha: self.lora_alpha,
                lora_dropout: self.lora_dropout,
                batch_size: self.batch_size,
                grad_accum: self.grad_accum,
                max_length: self.max_length,
                save_steps: self.save_steps,
                eval_steps: self.eval_steps,
                logging_steps: self.logging_steps,
                report_to: self.report_to,
                seed: self.seed,
                device: self.device.clone(),
                dtype: self.dtype.clone(),
                gradient_checkpointing: self.gradient_checkpointing,
                ..dpo
            },
            init_adapter: self.init_adapter.clone(),
            resume: self.resume,
            skip_bad: self.skip_bad,
            logging_dir: self.logging_dir.clone(),
            eval_data: self.eval_data.clone(),
            val_fraction: self.val_fraction,
            sample_prompts: self.sample_prompts.clone(),
            sample_every: self.sample_every,
            sample_max_new_tokens: self.sample_max_new_tokens,
            stop_after_steps: self.stop_after_steps,
            dump_first_step: self.dump_first_step.clone(),
        }
    }

    /// Writes the summary rank 0 returns (None: another rank, or --dump-first-step).
    fn finish(&self, summary: Option<serde_json::Value>) -> anyhow::Result<()> {
        if let Some(summary) = summary {
            self.json_summary.emit(&self.output.join("train_summary.json"), &summary)?;
            eprintln!("adapter, train_log.csv and train_summary.json written to {}", self.output.display());
        }
        Ok(())
    }
}

pub fn run_dpo(args: DpoArgs) -> anyhow::Result<()> {
    let dpo = Overrides {
        beta: args.beta,
        alpha: args.alpha,
        loss_type: args.loss_type,
        rejected_scoring: args.rejected_scoring,
        ..Overrides::default()
    };
    let run = DpoRun {
        run: args.common.run(dpo),
        precompute_reference: args.precompute_reference,
        share_prefix: !args.no_shared_prefix,
    };
    args.common.finish(stic::train::run::run_dpo(&run)?)
}

pub fn run_sft(args: SftArgs) -> anyhow::Result<()> {
    args.common.finish(stic::train::run::run_sft(&args.common.run(Overrides::default()))?)
}
