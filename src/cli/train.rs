use std::path::PathBuf;

use stic::dist::ProcessGroup;
use stic::lora::Adapter;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use stic::session::{parse_device, parse_dtype, Session};
use stic::train::data::{encode_conversation, image_path, image_size, read_records, PreferencePair};
use stic::train::dpo::{DpoObjective, LossType, PairExample, RejectedScoring};
use stic::stic::infuse::InstructionEntry;
use stic::train::sft::{SftExample, SftObjective};
use stic::train::samples::{SamplePrompts, SampleWriter};
use stic::train::tracking::ReportTo;
use stic::train::trainer::{check_enough_examples, EncodedRow, ImageLayout, Objective, RunReport, TrainConfig, Trainer};
use stic::{Error, Result};

pub const STAGE1_DEFAULTS: &str = include_str!("../../configs/paper/stage1.yaml");

/// Flags shared by `train-dpo` and `train-sft`; they override the YAML config.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Base model folder, or its hub id in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_args::hub_path)]
    model: PathBuf,
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
    #[arg(long, value_parser = super::choices::one_of(LossType::ALL.iter().map(super::choices::serde_name)))]
    loss_type: Option<String>,
    /// How the rejected response is scored: paper (its log-probability) or official_top_token (the official
    /// code's quirk).
    #[arg(long, value_parser = super::choices::one_of(RejectedScoring::ALL.iter().map(super::choices::serde_name)))]
    rejected_scoring: Option<String>,
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

fn parse<T: serde::de::DeserializeOwned>(value: &str, what: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.into())).map_err(|_| Error::Input(format!("unknown {what} '{value}'")))
}

pub const STAGE2_DEFAULTS: &str = include_str!("../../configs/paper/stage2.yaml");

impl TrainArgs {
    /// The config with the flags applied (`objective_flags` sets those of the objective), validated.
    fn config(&self, shipped: &str, objective_flags: impl FnOnce(&mut TrainConfig) -> Result<()>) -> Result<TrainConfig> {
        let mut cfg = match &self.config {
            Some(path) => TrainConfig::from_yaml(path)?,
            None => serde_yaml::from_str(shipped).expect("the shipped configs parse"),
        };
        macro_rules! set {
            ($field:expr, $flag:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
        }
        set!(cfg.lr, self.lr);
        set!(cfg.projector_lr, self.projector_lr);
        set!(cfg.epochs, self.epochs);
        set!(cfg.lora.r, self.lora_r);
        set!(cfg.lora.alpha, self.lora_alpha);
        set!(cfg.lora.dropout, self.lora_dropout);
        set!(cfg.batch_size, self.batch_size);
        set!(cfg.grad_accum, self.grad_accum);
        set!(cfg.max_length, self.max_length);
        set!(cfg.save_steps, self.save_steps);
        set!(cfg.seed, self.seed);
        set!(cfg.device, self.device);
        set!(cfg.dtype, self.dtype);
        set!(cfg.gradient_checkpointing, self.gradient_checkpointing);
        set!(cfg.report_to, self.report_to);
        set!(cfg.logging_steps, self.logging_steps);
        if self.eval_steps.is_some() {
            cfg.eval_steps = self.eval_steps;
        }
        if let Some(f) = self.val_fraction.filter(|f| !(*f > 0.0 && *f < 1.0)) {
            return Err(Error::Input(format!("--val-fraction {f}: give a fraction above 0 and below 1 (0.05 holds out 5% of --data)")));
        }
        if self.sample_every == Some(0) {
            return Err(Error::Input("--sample-every 0: give the number of steps between samples (at least 1)".into()));
        }
        if self.max_steps.is_some() {
            cfg.max_steps = self.max_steps;
        }
        if cfg.disable_dropout {
            cfg.lora.dropout = 0.0;
        }
        objective_flags(&mut cfg)?;
        cfg.validate()?;
        let mut inputs = vec![("--model", self.model.as_path()), ("--data", self.data.as_path())];
        inputs.extend(self.init_adapter.as_deref().map(|adapter| ("--init-adapter", adapter)));
        inputs.extend(self.eval_data.as_deref().map(|data| ("--eval-data", data)));
        inputs.extend(self.sample_prompts.as_deref().map(|prompts| ("--sample-prompts", prompts)));
        stic::fsutil::check_output("--output", &self.output, &inputs)?;
        Ok(cfg)
    }

    /// Loads the model; under torchrun each rank takes its own GPU (cuda:LOCAL_RANK) when training on CUDA.
    fn load(&self, cfg: &TrainConfig, group: Option<&ProcessGroup>) -> Result<Session> {
        let device = parse_device(&cfg.device)?;
        let device = group.map_or(device, |g| g.device_for(device));
        let kind = parse_dtype(&cfg.dtype, device)?;
        let mut session = Session::load(&self.model, None, self.processing.processing, kind, device)?;
        if cfg.image_layout == ImageLayout::PadFlat {
            session.model.cfg.image.aspect_mode = stic::image::AspectMode::Pad;
            session.model.cfg.image.patch_merge = stic::image::PatchMerge::Flat;
        }
        Ok(session)
    }

    /// The `--sample-prompts`, checked before any training (rank 0 writes the samples).
    fn sample_prompts(&self, session: &Session, group: Option<&ProcessGroup>) -> Result<Option<SamplePrompts>> {
        match &self.sample_prompts {
            Some(file) if group.is_none_or(|g| g.is_main()) => SamplePrompts::load(file, &self.image_dir, session.model.cfg.image.max_pixels).map(Some),
            _ => Ok(None),
        }
    }

    /// The training and the held-out records: `--eval-data` read with `read`, or `--val-fraction` of `--data`.
    fn split<R>(&self, cfg: &TrainConfig, records: Vec<(usize, R)>, skipped: Vec<String>, read: impl Fn(&std::path::Path) -> Result<(Vec<(usize, R)>, Vec<String>)>) -> Result<DataSets<R>> {
        let train = DataSource { path: self.data.clone(), records, skipped };
        if let Some(path) = &self.eval_data {
            let (records, skipped) = read(path)?;
            return Ok(DataSets { train, eval: Some(DataSource { path: path.clone(), records, skipped }), held_out: Vec::new() });
        }
        let Some(fraction) = self.val_fraction else { return Ok(DataSets { train, eval: None, held_out: Vec::new() }) };
        let n = train.records.len();
        if n < 2 {
            return Err(Error::Input(format!("--val-fraction: {} has {n} usable record(s); holding some out needs at least 2", self.data.display())));
        }
        let held = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ VAL_SPLIT_SALT));
        let mut is_held = vec![false; n];
        order[..held].iter().for_each(|&i| is_held[i] = true);
        let (mut kept, mut eval) = (Vec::new(), Vec::new());
        for (record, held) in train.records.into_iter().zip(is_held) {
            if held { eval.push(record) } else { kept.push(record) }
        }
        let held_out = eval.iter().map(|(position, _)| *position).collect();
        let eval = DataSource { path: self.data.clone(), records: eval, skipped: Vec::new() };
        Ok(DataSets { train: DataSource { records: kept, ..train }, eval: Some(eval), held_out })
    }

    fn attach_adapter(&self, model: &mut stic::model::LlavaNext, cfg: &TrainConfig) -> Result<Adapter> {
        tch::manual_seed(cfg.seed as i64);
        match &self.init_adapter {
            Some(dir) => Adapter::load(model, dir, true),
            None => Adapter::inject(model, &cfg.lora),
        }
    }

    /// Builds the examples of every record (training and held out), skipping (with `--skip-bad`) or stopping at
    /// the first bad one. `build` gives the example, how many of its responses were truncated and its image
    /// feature count.
    fn examples<R, E>(&self, what: &str, cfg: &TrainConfig, group: Option<&ProcessGroup>, sets: DataSets<R>, mut build: impl FnMut(usize, &R) -> std::result::Result<(E, usize, usize), String>) -> Result<Examples<E>> {
        let quiet = group.is_some_and(|g| !g.is_main());
        let (train, mut report) = self.build(what, cfg.max_length, quiet, sets.train, &mut build)?;
        let eval = match sets.eval {
            Some(source) => {
                let (path, held_out) = (source.path.display().to_string(), !sets.held_out.is_empty());
                let (eval, eval_report) = self.build(&format!("held-out {what}"), cfg.max_length, quiet, source, &mut build)?;
                let source = if held_out { format!("--val-fraction {} of {path}", self.val_fraction.unwrap_or_default()) } else { path };
                report["eval"] = serde_json::json!({"source": source, "records": sets.held_out, "report": eval_report});
                eval
            }
            None => Vec::new(),
        };
        report["used"] = train.len().into();
        // --dump-first-step runs one full micro-batch; training needs one example per rank
        let needed = if self.dump_first_step.is_some() { cfg.batch_size } else { stic::dist::rank_and_world(group).1 };
        check_enough_examples(train.len(), needed, what)?;
        Ok(Examples { train, eval, report })
    }

    /// The examples of one data file, and what was skipped or cut (for the summary).
    fn build<R, E>(&self, what: &str, max_length: usize, quiet: bool, source: DataSource<R>, build: &mut impl FnMut(usize, &R) -> std::result::Result<(E, usize, usize), String>) -> Result<(Vec<E>, serde_json::Value)> {
        let path = source.path.display();
        let mut examples = Vec::new();
        let mut problems = source.skipped;
        let mut truncated = 0;
        let (mut fewest_features, mut most_features) = (usize::MAX, 0);
        for (position, record) in &source.records {
            match build(*position, record) {
                Ok((example, cut, features)) => {
                    examples.push(example);
                    truncated += cut;
                    fewest_features = fewest_features.min(features);
                    most_features = most_features.max(features);
                }
                Err(why) if self.skip_bad => problems.push(format!("{path} record {position}: {why}")),
                Err(why) => return Err(Error::Input(format!("{path} record {position}: {why} (pass --skip-bad to skip such records)"))),
            }
        }
        if examples.is_empty() {
            return Err(Error::Input(format!("{path}: no usable {what} ({} skipped: {})", problems.len(), problems.join("; "))));
        }
        if !quiet {
            for p in &problems {
                eprintln!("skipped: {p}");
            }
            eprintln!(
                "{} {what} ({} skipped, {truncated} responses truncated to max_length {max_length}; image features per example {fewest_features}-{most_features})",
                examples.len(),
                problems.len()
            );
        }
        let report = serde_json::json!({"used": examples.len(), "skipped": problems.len(), "skipped_why": problems, "truncated": truncated});
        Ok((examples, report))
    }

    fn image_features(&self, model: &stic::model::LlavaNext, name: &str) -> std::result::Result<(PathBuf, usize), String> {
        let path = image_path(&self.image_dir, name).map_err(|e| e.to_string())?;
        let size = image_size(&path).map_err(|e| e.to_string())?;
        let (pixels, limit) = (u64::from(size.0) * u64::from(size.1), model.cfg.image.max_pixels);
        if pixels > limit {
            let what = path.display().to_string();
            return Err(stic::image::ImageError::TooManyPixels { what, width: size.1, height: size.0, pixels, limit }.to_string());
        }
        Ok((path, stic::image::anyres::num_image_features(size, &model.cfg.image, model.cfg.vision.patch_size as u32)))
    }

    #[allow(clippy::too_many_arguments)]
    fn train<O: Objective>(&self, command: &str, session: &Session, adapter: &Adapter, objective: O, examples: Examples<O::Example>, samples: Option<SamplePrompts>, cfg: TrainConfig, group: Option<ProcessGroup>) -> Result<()> {
        let logging_dir = self.logging_dir.clone().unwrap_or_else(|| self.output.join("runs"));
        let sample_every = self.sample_every.unwrap_or_else(|| cfg.eval_every());
        let samples = samples.map(|prompts| SampleWriter::new(session, prompts, cfg.template, sample_every, self.sample_max_new_tokens, &self.output));
        let samples_path = samples.as_ref().map(|s| s.path().to_path_buf());
        let has_eval = !examples.eval.is_empty();
        let mut trainer = Trainer {
            model: &session.model,
            adapter,
            objective,
            examples: examples.train,
            cfg,
            output: self.output.clone(),
            base_model: self.model.display().to_string(),
            stop_after: self.stop_after_steps,
            group: group.as_ref(),
            eval_examples: examples.eval,
            logging_dir,
            samples,
        };
        let report = trainer.run(self.resume)?;
        let main = group.as_ref().is_none_or(|g| g.is_main());
        if let Some(group) = group {
            group.finish()?;
        }
        if main {
            let summary = self.summary(command, &report, examples.report, has_eval, samples_path);
            self.json_summary.emit(&self.output.join("train_summary.json"), &summary)?;
            eprintln!("adapter, train_log.csv and train_summary.json written to {}", self.output.display());
        }
        Ok(())
    }

    fn summary(&self, command: &str, report: &RunReport, examples: serde_json::Value, has_eval: bool, samples: Option<PathBuf>) -> serde_json::Value {
        let out = |name: &str| self.output.join(name).display().to_string();
        let finished = report.steps == report.total_steps;
        let strip = |entry: &Option<serde_json::Map<String, serde_json::Value>>, prefix: &str| {
            entry.as_ref().map(|e| e.iter().filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone()))).collect::<serde_json::Map<_, _>>())
        };
        serde_json::json!({
            "command": command,
            "finished": finished,
            "steps": report.steps,
            "total_steps": report.total_steps,
            "resumed_from_step": report.start_step,
            "epochs": report.epochs,
            "seconds": report.seconds,
            "train_tokens": report.tokens,
            "train_tokens_per_s": report.tokens as f64 / report.seconds.max(1e-9),
            "examples": examples,
            "final": strip(&report.last_train, ""),
            "eval": strip(&report.last_eval, "eval_"),
            "best_metric": report.best_metric,
            "best_model_checkpoint": report.best_model_checkpoint,
            "outputs": {
                "adapter": finished.then(|| self.output.display().to_string()),
                "train_log": out("train_log.csv"),
                "eval_log": has_eval.then(|| out("eval_log.csv")),
                "trainer_state": out("trainer_state.json"),
                "tensorboard": report.logging_dir.as_ref().map(|d| d.display().to_string()),
                "curves": out(stic::train::curves::FILE),
                "samples": samples.map(|p| p.display().to_string()),
            },
        })
    }
}

/// Records of one data file.
struct DataSource<R> {
    path: PathBuf,
    records: Vec<(usize, R)>,
    skipped: Vec<String>,
}

struct DataSets<R> {
    train: DataSource<R>,
    eval: Option<DataSource<R>>,
    /// The records of --data held out by --val-fraction.
    held_out: Vec<usize>,
}

struct Examples<E> {
    train: Vec<E>,
    eval: Vec<E>,
    /// Counts of used, skipped and truncated records, for the summary.
    report: serde_json::Value,
}

/// Mixed into the seed of the --val-fraction split, so that it does not follow the epochs' example order.
const VAL_SPLIT_SALT: u64 = 0x5eed_0f_0a1d;

pub fn run_dpo(args: DpoArgs) -> anyhow::Result<()> {
    let a = &args.common;
    let cfg = a.config(STAGE1_DEFAULTS, |cfg| set_dpo_flags(&args, cfg))?;
    let group = ProcessGroup::from_env()?;
    let mut session = a.load(&cfg, group.as_ref())?;
    let samples = a.sample_prompts(&session, group.as_ref())?;
    let (records, skipped) = read_records::<PreferencePair>(&a.data, a.skip_bad)?;
    let sets = a.split(&cfg, records, skipped, |path| read_records::<PreferencePair>(path, a.skip_bad))?;
    let (model, tokenizer) = (&session.model, &session.tokenizer);
    let examples = a.examples("preference pairs", &cfg, group.as_ref(), sets, |_, pair| {
        let (prompt, chosen, rejected) = pair.parts()?;
        let (image, features) = if cfg.text_only { (None, 0) } else { a.image_features(model, &pair.image).map(|(p, n)| (Some(p), n))? };
        let user = user_message(prompt, image.is_some(), &cfg)?;
        let row = |response: &str| encode_conversation(tokenizer, cfg.template, &[(user.clone(), response.to_string())], features, cfg.max_length);
        let ((chosen, c_cut), (rejected, r_cut)) = (row(chosen)?, row(rejected)?);
        Ok((PairExample { image, chosen, rejected }, c_cut as usize + r_cut as usize, features))
    })?;
    let adapter = a.attach_adapter(&mut session.model, &cfg)?;
    let mut objective = DpoObjective { cfg: cfg.dpo, checkpointing: cfg.gradient_checkpointing, share_prefix: !args.no_shared_prefix, reference_cache: None };
    if let Some(path) = &a.dump_first_step {
        let first = &examples.train[..cfg.batch_size];
        let rows = first.iter().map(|e| &e.chosen).chain(first.iter().map(|e| &e.rejected)).collect();
        return dump_first_step(&session.model, &adapter, &objective, first, rows, session.tokenizer.pad_id, path);
    }
    if args.precompute_reference {
        objective.reference_cache = Some(precompute_reference(&session.model, &objective, &examples.train)?);
    }
    a.train("train-dpo", &session, &adapter, objective, examples, samples, cfg, group)?;
    Ok(())
}

fn set_dpo_flags(args: &DpoArgs, cfg: &mut TrainConfig) -> Result<()> {
    if let Some(v) = args.beta {
        cfg.dpo.beta = v;
    }
    if let Some(v) = args.alpha {
        cfg.dpo.alpha = v;
    }
    if let Some(v) = &args.loss_type {
        cfg.dpo.loss_type = parse::<LossType>(v, "loss type (sigmoid, hinge, ipo)")?;
    }
    if let Some(v) = &args.rejected_scoring {
        cfg.dpo.rejected_scoring = parse::<RejectedScoring>(v, "rejected scoring (paper, official_top_token)")?;
    }
    Ok(())
}

pub fn run_sft(args: SftArgs) -> anyhow::Result<()> {
    let a = &args.common;
    let cfg = a.config(STAGE2_DEFAULTS, |_| Ok(()))?;
    let group = ProcessGroup::from_env()?;
    let mut session = a.load(&cfg, group.as_ref())?;
    let samples = a.sample_prompts(&session, group.as_ref())?;
    let read = |path: &std::path::Path| -> Result<(Vec<(usize, InstructionEntry)>, Vec<String>)> {
        Ok(((1..).zip(stic::stic::infuse::load_instruction_data(path)?).collect(), Vec::new()))
    };
    let (records, skipped) = read(&a.data)?;
    let sets = a.split(&cfg, records, skipped, read)?;
    let (model, tokenizer) = (&session.model, &session.tokenizer);
    let examples = a.examples("conversations", &cfg, group.as_ref(), sets, |_, entry| {
        let turns = entry.training_turns()?;
        let (image, features) = match &entry.image {
            Some(name) if !cfg.text_only => {
                let (path, n) = a.image_features(model, name)?;
                (Some(path), n)
            }
            _ => (None, 0),
        };
        let turns = turns
            .into_iter()
            .enumerate()
            .map(|(i, (user, answer))| Ok((user_message(&user, i == 0 && image.is_some(), &cfg)?, answer)))
            .collect::<std::result::Result<Vec<(String, String)>, String>>()?;
        let (row, cut) = encode_conversation(tokenizer, cfg.template, &turns, features, cfg.max_length)?;
        Ok((SftExample { image, row }, cut as usize, features))
    })?;
    let adapter = a.attach_adapter(&mut session.model, &cfg)?;
    let objective = SftObjective { checkpointing: cfg.gradient_checkpointing };
    if let Some(path) = &a.dump_first_step {
        let first = &examples.train[..cfg.batch_size];
        return dump_first_step(&session.model, &adapter, &objective, first, first.iter().map(|e| &e.row).collect(), session.tokenizer.pad_id, path);
    }
    a.train("train-sft", &session, &adapter, objective, examples, samples, cfg, group)?;
    Ok(())
}

/// A user message as the model sees it: `<image>` placed as configured, or refused in a text-only run.
fn user_message(text: &str, with_image: bool, cfg: &TrainConfig) -> std::result::Result<String, String> {
    if cfg.text_only && text.contains(stic::text::tokenizer::IMAGE_TOKEN) {
        return Err("the message holds <image> but the config says text_only".into());
    }
    let text = if cfg.image_token_first { stic::text::templates::image_token_first(text) } else { text.to_string() };
    Ok(if with_image { Session::user_text(&text, true) } else { text })
}

fn precompute_reference(model: &stic::model::LlavaNext, objective: &DpoObjective, examples: &[PairExample]) -> Result<Vec<(f64, f64)>> {
    let mut bar = stic::progress::Progress::new(examples.len() as u64, 0, "reference log-probs", "pairs", true);
    let mut out = Vec::with_capacity(examples.len());
    for e in examples {
        let batch = objective.pack(model, &[e])?;
        let image = e.image.as_deref().map(|path| stic::train::dpo::PairImage::load(model, path)).transpose()?;
        let logps: Vec<f64> = Vec::try_from(objective.reference_logps(model, &batch, image.as_slice())?.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu)).expect("f64");
        out.push((logps[0], logps[1]));
        bar.inc(1);
    }
    bar.finish();
    Ok(out)
}

/// Runs the first micro-batch and writes its loss, the same rows right-padded (as the reference implementations
/// take them) and the adapter's gradients and weights.
fn dump_first_step<O: Objective>(model: &stic::model::LlavaNext, adapter: &Adapter, objective: &O, examples: &[O::Example], rows: Vec<&EncodedRow>, pad_id: i64, path: &std::path::Path) -> anyhow::Result<()> {
    let picked: Vec<(usize, &O::Example)> = examples.iter().enumerate().collect();
    let out = objective.step(model, &picked, 1.0, 0)?;
    let (ids, mask, scored) = stic::train::packing::padded(&rows, pad_id);
    let mut tensors = vec![
        ("loss".to_string(), tch::Tensor::from_slice(&[out.metrics[0]])),
        ("input_ids".to_string(), tch::Tensor::from_slice(&model.cfg.reference_ids(&Vec::<i64>::try_from(ids.flatten(0, 1))?)).view_as(&ids)),
        ("attention_mask".to_string(), mask),
        ("scored".to_string(), scored),
    ];
    for (name, param) in adapter.parameters() {
        tensors.push((format!("grad.{name}"), param.grad()));
        tensors.push((format!("param.{name}"), param.detach()));
    }
    stic::model::weights::save_safetensors(path, &tensors)?;
    Ok(())
}
