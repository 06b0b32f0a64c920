use std::path::PathBuf;

use stic::lora::Adapter;
use stic::session::{parse_device, parse_dtype};
use stic::train::data::{encode_conversation, image_path, image_size, read_records, PreferencePair};
use stic::train::dpo::{token_batch, DpoObjective, LossType, PairExample, RejectedScoring};
use stic::train::trainer::{Objective, TrainConfig, Trainer};
use stic::{Error, Result};

const STAGE1_DEFAULTS: &str = include_str!("../../configs/stic-stage1.yaml");

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    /// Preference pairs: JSON list or JSONL in the stic-coco-preference-6k schema.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    image_dir: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// YAML settings (default: configs/stic-stage1.yaml as shipped); the flags below override them.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start from this adapter instead of a fresh one.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    projector_lr: Option<f64>,
    #[arg(long)]
    beta: Option<f64>,
    #[arg(long)]
    alpha: Option<f64>,
    /// sigmoid, hinge or ipo.
    #[arg(long)]
    loss_type: Option<String>,
    /// paper or official_top_token.
    #[arg(long)]
    rejected_scoring: Option<String>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long)]
    save_steps: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
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
    /// Compute the reference log-probs of every pair once before training (cached in --output).
    #[arg(long)]
    precompute_reference: bool,
    /// Stop after this many optimizer steps, as if interrupted (tests resume with it).
    #[arg(long, hide = true)]
    stop_after_steps: Option<usize>,
    /// Write the loss, log-probs and LoRA gradients of the first micro-batch to this safetensors file and exit.
    #[arg(long, hide = true)]
    dump_first_step: Option<PathBuf>,
}

fn parse<T: serde::de::DeserializeOwned>(value: &str, what: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.into())).map_err(|_| Error::Input(format!("unknown {what} '{value}'")))
}

pub fn config(args: &Args) -> Result<TrainConfig> {
    let mut cfg = match &args.config {
        Some(path) => TrainConfig::from_yaml(path)?,
        None => serde_yaml::from_str(STAGE1_DEFAULTS).expect("the shipped stage-1 config parses"),
    };
    macro_rules! set {
        ($field:expr, $flag:expr) => {
            if let Some(v) = $flag.clone() {
                $field = v;
            }
        };
    }
    set!(cfg.lr, args.lr);
    set!(cfg.projector_lr, args.projector_lr);
    set!(cfg.epochs, args.epochs);
    set!(cfg.dpo.beta, args.beta);
    set!(cfg.dpo.alpha, args.alpha);
    set!(cfg.lora.r, args.lora_r);
    set!(cfg.lora.alpha, args.lora_alpha);
    set!(cfg.lora.dropout, args.lora_dropout);
    set!(cfg.batch_size, args.batch_size);
    set!(cfg.grad_accum, args.grad_accum);
    set!(cfg.max_length, args.max_length);
    set!(cfg.save_steps, args.save_steps);
    set!(cfg.seed, args.seed);
    set!(cfg.device, args.device);
    set!(cfg.dtype, args.dtype);
    set!(cfg.gradient_checkpointing, args.gradient_checkpointing);
    if args.max_steps.is_some() {
        cfg.max_steps = args.max_steps;
    }
    if let Some(v) = &args.loss_type {
        cfg.dpo.loss_type = parse::<LossType>(v, "loss type (sigmoid, hinge, ipo)")?;
    }
    if let Some(v) = &args.rejected_scoring {
        cfg.dpo.rejected_scoring = parse::<RejectedScoring>(v, "rejected scoring (paper, official_top_token)")?;
    }
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.lora.r == 0 {
        return Err(Error::Input("batch_size, grad_accum and lora r must be at least 1".into()));
    }
    Ok(cfg)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = config(&args)?;
    let device = parse_device(&cfg.device)?;
    let kind = parse_dtype(&cfg.dtype, device)?;
    let session = stic::session::Session::load(&args.model, None, kind, device)?;
    let mut model = session.model;
    let tokenizer = session.tokenizer;
    let (records, skipped) = read_records::<PreferencePair>(&args.data, args.skip_bad)?;
    let mut examples = Vec::new();
    let mut problems = skipped;
    let mut truncated = 0;
    for (position, pair) in &records {
        let built = (|| -> std::result::Result<PairExample, String> {
            let (prompt, chosen, rejected) = pair.parts()?;
            let path = image_path(&args.image_dir, &pair.image, &args.data, *position).map_err(|e| e.to_string())?;
            let size = image_size(&path).map_err(|e| e.to_string())?;
            let features = stic::image::anyres::num_image_features(size, &model.cfg.image, model.cfg.vision.patch_size as u32);
            let user = stic::session::Session::user_text(prompt, true);
            let mut row = |response: &str| {
                let (row, cut) = encode_conversation(&tokenizer, cfg.template, &[(user.clone(), response.to_string())], features, cfg.max_length)?;
                truncated += cut as usize;
                Ok::<_, String>(row)
            };
            Ok(PairExample { image: path, chosen: row(chosen)?, rejected: row(rejected)? })
        })();
        match built {
            Ok(example) => examples.push(example),
            Err(why) if args.skip_bad => problems.push(format!("{} record {position}: {why}", args.data.display())),
            Err(why) => return Err(Error::Input(format!("{} record {position}: {why} (pass --skip-bad to skip such records)", args.data.display())).into()),
        }
    }
    for p in &problems {
        eprintln!("skipped: {p}");
    }
    if examples.is_empty() {
        return Err(Error::Input(format!("{}: no usable preference pairs", args.data.display())).into());
    }
    eprintln!(
        "{} preference pairs ({} skipped, {truncated} responses truncated to max_length {})",
        examples.len(),
        problems.len(),
        cfg.max_length
    );
    tch::manual_seed(cfg.seed as i64);
    let adapter = match &args.init_adapter {
        Some(dir) => Adapter::load(&mut model, dir, true)?,
        None => Adapter::inject(&mut model, &cfg.lora)?,
    };
    let mut objective = DpoObjective { cfg: cfg.dpo, checkpointing: cfg.gradient_checkpointing, pad_id: tokenizer.pad_id, reference_cache: None };
    if let Some(path) = &args.dump_first_step {
        return dump_first_step(&model, &adapter, &objective, &examples[..cfg.batch_size.min(examples.len())], path);
    }
    if args.precompute_reference {
        objective.reference_cache = Some(precompute_reference(&model, &objective, &examples)?);
    }
    let mut trainer = Trainer {
        model: &model,
        adapter: &adapter,
        objective,
        examples,
        cfg,
        output: args.output.clone(),
        base_model: args.model.display().to_string(),
        stop_after: args.stop_after_steps,
    };
    trainer.run(args.resume)?;
    eprintln!("adapter and train_log.csv written to {}", args.output.display());
    Ok(())
}

fn precompute_reference(model: &stic::model::LlavaNext, objective: &DpoObjective, examples: &[PairExample]) -> Result<Vec<(f64, f64)>> {
    let bar = indicatif::ProgressBar::new(examples.len() as u64).with_message("reference log-probs");
    let mut out = Vec::with_capacity(examples.len());
    for e in examples {
        let batch = token_batch(&[&e.chosen, &e.rejected], objective.pad_id, model.device());
        let image = stic::train::trainer::load_preprocessed(model, &e.image)?;
        let logps: Vec<f64> = Vec::try_from(objective.reference_logps(model, &batch, &[&image])?.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu)).expect("f64");
        out.push((logps[0], logps[1]));
        bar.inc(1);
    }
    bar.finish();
    Ok(out)
}

fn dump_first_step(model: &stic::model::LlavaNext, adapter: &Adapter, objective: &DpoObjective, examples: &[PairExample], path: &std::path::Path) -> anyhow::Result<()> {
    let picked: Vec<(usize, &PairExample)> = examples.iter().enumerate().collect();
    let out = objective.step(model, &picked, 1.0, 0)?;
    let rows: Vec<&stic::train::trainer::EncodedRow> = examples.iter().map(|e| &e.chosen).chain(examples.iter().map(|e| &e.rejected)).collect();
    let batch = token_batch(&rows, objective.pad_id, tch::Device::Cpu);
    let mut tensors = vec![
        ("loss".to_string(), tch::Tensor::from_slice(&[out.metrics[0]])),
        ("input_ids".to_string(), batch.ids),
        ("attention_mask".to_string(), batch.mask),
        ("scored".to_string(), batch.scored.to_kind(tch::Kind::Int64)),
    ];
    for (name, param) in adapter.parameters() {
        tensors.push((format!("grad.{name}"), param.grad()));
        tensors.push((format!("param.{name}"), param.detach()));
    }
    stic::model::weights::save_safetensors(path, &tensors)?;
    Ok(())
}
