use std::path::PathBuf;

use stic::dist::ProcessGroup;
use stic::lora::Adapter;
use stic::session::{parse_device, parse_dtype};
use stic::train::data::{encode_conversation, image_path, image_size, read_records, PreferencePair};
use stic::train::dpo::{DpoObjective, LossType, PairExample, RejectedScoring};
use stic::stic::infuse::InstructionEntry;
use stic::train::sft::{SftExample, SftObjective};
use stic::train::trainer::{check_global_batch, EncodedRow, ImageLayout, Objective, TrainConfig, Trainer};
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
        stic::fsutil::check_output("--output", &self.output, &inputs)?;
        Ok(cfg)
    }

    /// Loads the model; under torchrun each rank takes its own GPU (cuda:LOCAL_RANK) when training on CUDA.
    fn load(&self, cfg: &TrainConfig, group: Option<&ProcessGroup>) -> Result<(stic::model::LlavaNext, stic::text::TextTokenizer)> {
        let device = parse_device(&cfg.device)?;
        let device = group.map_or(device, |g| g.device_for(device));
        let kind = parse_dtype(&cfg.dtype, device)?;
        let mut session = stic::session::Session::load(&self.model, None, self.processing.processing, kind, device)?;
        if cfg.image_layout == ImageLayout::PadFlat {
            session.model.cfg.image.aspect_mode = stic::image::AspectMode::Pad;
            session.model.cfg.image.patch_merge = stic::image::PatchMerge::Flat;
        }
        Ok((session.model, session.tokenizer))
    }

    fn attach_adapter(&self, model: &mut stic::model::LlavaNext, cfg: &TrainConfig) -> Result<Adapter> {
        tch::manual_seed(cfg.seed as i64);
        match &self.init_adapter {
            Some(dir) => Adapter::load(model, dir, true),
            None => Adapter::inject(model, &cfg.lora),
        }
    }

    /// Builds the examples of every record, skipping (with `--skip-bad`) or stopping at the first bad one.
    /// `build` gives the example, how many of its responses were truncated and its image feature count.
    fn examples<R, E>(&self, what: &str, cfg: &TrainConfig, group: Option<&ProcessGroup>, records: &[(usize, R)], skipped: Vec<String>, mut build: impl FnMut(usize, &R) -> std::result::Result<(E, usize, usize), String>) -> Result<Vec<E>> {
        let (max_length, quiet) = (cfg.max_length, group.is_some_and(|g| !g.is_main()));
        let mut examples = Vec::new();
        let mut problems = skipped;
        let mut truncated = 0;
        let (mut fewest_features, mut most_features) = (usize::MAX, 0);
        for (position, record) in records {
            match build(*position, record) {
                Ok((example, cut, features)) => {
                    examples.push(example);
                    truncated += cut;
                    fewest_features = fewest_features.min(features);
                    most_features = most_features.max(features);
                }
                Err(why) if self.skip_bad => problems.push(format!("{} record {position}: {why}", self.data.display())),
                Err(why) => return Err(Error::Input(format!("{} record {position}: {why} (pass --skip-bad to skip such records)", self.data.display()))),
            }
        }
        if examples.is_empty() {
            return Err(Error::Input(format!("{}: no usable {what} ({} skipped: {})", self.data.display(), problems.len(), problems.join("; "))));
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
        // --dump-first-step runs one micro-batch only
        let (world, grad_accum) = if self.dump_first_step.is_some() { (1, 1) } else { (stic::dist::rank_and_world(group).1, cfg.grad_accum) };
        check_global_batch(examples.len(), world, cfg.batch_size, grad_accum, what)?;
        Ok(examples)
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

    fn train<O: Objective>(&self, model: &stic::model::LlavaNext, adapter: &Adapter, objective: O, examples: Vec<O::Example>, cfg: TrainConfig, group: Option<ProcessGroup>) -> Result<()> {
        let mut trainer = Trainer {
            model,
            adapter,
            objective,
            examples,
            cfg,
            output: self.output.clone(),
            base_model: self.model.display().to_string(),
            stop_after: self.stop_after_steps,
            group: group.as_ref(),
        };
        trainer.run(self.resume)?;
        let main = group.as_ref().is_none_or(|g| g.is_main());
        if let Some(group) = group {
            group.finish()?;
        }
        if main {
            eprintln!("adapter and train_log.csv written to {}", self.output.display());
        }
        Ok(())
    }
}

pub fn run_dpo(args: DpoArgs) -> anyhow::Result<()> {
    let a = &args.common;
    let cfg = a.config(STAGE1_DEFAULTS, |cfg| set_dpo_flags(&args, cfg))?;
    let group = ProcessGroup::from_env()?;
    let (mut model, tokenizer) = a.load(&cfg, group.as_ref())?;
    let (records, skipped) = read_records::<PreferencePair>(&a.data, a.skip_bad)?;
    let examples = a.examples("preference pairs", &cfg, group.as_ref(), &records, skipped, |_, pair| {
        let (prompt, chosen, rejected) = pair.parts()?;
        let (image, features) = if cfg.text_only { (None, 0) } else { a.image_features(&model, &pair.image).map(|(p, n)| (Some(p), n))? };
        let user = user_message(prompt, image.is_some(), &cfg)?;
        let row = |response: &str| encode_conversation(&tokenizer, cfg.template, &[(user.clone(), response.to_string())], features, cfg.max_length);
        let ((chosen, c_cut), (rejected, r_cut)) = (row(chosen)?, row(rejected)?);
        Ok((PairExample { image, chosen, rejected }, c_cut as usize + r_cut as usize, features))
    })?;
    let adapter = a.attach_adapter(&mut model, &cfg)?;
    let mut objective = DpoObjective { cfg: cfg.dpo, checkpointing: cfg.gradient_checkpointing, share_prefix: !args.no_shared_prefix, reference_cache: None };
    if let Some(path) = &a.dump_first_step {
        let first = &examples[..cfg.batch_size];
        let rows = first.iter().map(|e| &e.chosen).chain(first.iter().map(|e| &e.rejected)).collect();
        return dump_first_step(&model, &adapter, &objective, first, rows, tokenizer.pad_id, path);
    }
    if args.precompute_reference {
        objective.reference_cache = Some(precompute_reference(&model, &objective, &examples)?);
    }
    a.train(&model, &adapter, objective, examples, cfg, group)?;
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
    let (mut model, tokenizer) = a.load(&cfg, group.as_ref())?;
    let entries = stic::stic::infuse::load_instruction_data(&a.data)?;
    let records: Vec<(usize, InstructionEntry)> = (1..).zip(entries).collect();
    let examples = a.examples("conversations", &cfg, group.as_ref(), &records, Vec::new(), |_, entry| {
        let turns = entry.training_turns()?;
        let (image, features) = match &entry.image {
            Some(name) if !cfg.text_only => {
                let (path, n) = a.image_features(&model, name)?;
                (Some(path), n)
            }
            _ => (None, 0),
        };
        let turns = turns
            .into_iter()
            .enumerate()
            .map(|(i, (user, answer))| Ok((user_message(&user, i == 0 && image.is_some(), &cfg)?, answer)))
            .collect::<std::result::Result<Vec<(String, String)>, String>>()?;
        let (row, cut) = encode_conversation(&tokenizer, cfg.template, &turns, features, cfg.max_length)?;
        Ok((SftExample { image, row }, cut as usize, features))
    })?;
    let adapter = a.attach_adapter(&mut model, &cfg)?;
    let objective = SftObjective { checkpointing: cfg.gradient_checkpointing };
    if let Some(path) = &a.dump_first_step {
        let first = &examples[..cfg.batch_size];
        return dump_first_step(&model, &adapter, &objective, first, first.iter().map(|e| &e.row).collect(), tokenizer.pad_id, path);
    }
    a.train(&model, &adapter, objective, examples, cfg, group)?;
    Ok(())
}

/// A user message as the model sees it: `<image>` placed as configured, or refused in a text-only run.
fn user_message(text: &str, with_image: bool, cfg: &TrainConfig) -> std::result::Result<String, String> {
    if cfg.text_only && text.contains(stic::text::tokenizer::IMAGE_TOKEN) {
        return Err("the message holds <image> but the config says text_only".into());
    }
    let text = if cfg.image_token_first { stic::text::templates::image_token_first(text) } else { text.to_string() };
    Ok(if with_image { stic::session::Session::user_text(&text, true) } else { text })
}

fn precompute_reference(model: &stic::model::LlavaNext, objective: &DpoObjective, examples: &[PairExample]) -> Result<Vec<(f64, f64)>> {
    let bar = indicatif::ProgressBar::new(examples.len() as u64).with_message("reference log-probs");
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
