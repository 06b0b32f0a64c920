//! `train-dpo` and `train-sft` from their options to the finished adapter and the run's summary.
use std::path::{Path, PathBuf};

use super::config::{TrainConfig, STAGE1_DEFAULTS, STAGE2_DEFAULTS};
use super::data::{encode_conversation, read_records, PreferencePair, Records};
use super::dpo::{DpoObjective, PairExample, PairImage};
use super::objective::{EncodedRow, Objective};
use super::samples::{SamplePrompts, SampleWriter};
use super::setup::{user_message, DpoRun, Examples, TrainRun};
use super::sft::{SftExample, SftObjective};
use super::trainer::{RunReport, Trainer};
use crate::adapter::Adapter;
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};
use crate::generate::session::Session;
use crate::method::infuse::{load_instruction_data, InstructionEntry};
use crate::model::LlavaNext;

/// Trains an adapter with DPO on preference pairs (STIC stage 1). Returns the run's summary on rank 0 (None on
/// the other ranks and after `dump_first_step`).
pub fn run_dpo(dpo: &DpoRun) -> Result<Option<serde_json::Value>> {
    let run = &dpo.run;
    let cfg = run.config(STAGE1_DEFAULTS)?;
    if cfg.pooled_device_batch().is_some() {
        return Err(Error::Input(
            "loss_weighting: device_batch pools token losses, and train-dpo has none (its loss is one per pair); \
             remove loss_weighting and device_batch from the --config YAML"
                .into(),
        ));
    }
    let group = ProcessGroup::from_env()?;
    let mut session = run.load(&cfg, group.as_ref())?;
    let samples = run.sample_prompts(&session, group.as_ref())?;
    let sets = run.split(&cfg, |path| read_records::<PreferencePair>(path, run.skip_bad))?;
    let (model, tokenizer) = (&session.model, &session.tokenizer);
    let examples = run.examples("preference pairs", &cfg, group.as_ref(), sets, |pair| {
        let (prompt, chosen, rejected) = pair.parts()?;
        let (image, features) = if cfg.text_only {
            (None, 0)
        } else {
            run.image_features(model, &pair.image).map(|(p, n)| (Some(p), n))?
        };
        let user = user_message(prompt, image.is_some(), &cfg)?;
        let row = |response: &str| {
            encode_conversation(
                tokenizer,
                cfg.template,
                &[(user.clone(), response.to_string())],
                features,
                cfg.max_length,
            )
        };
        let ((chosen, c_cut), (rejected, r_cut)) = (row(chosen)?, row(rejected)?);
        Ok((PairExample { image, chosen, rejected }, c_cut as usize + r_cut as usize, features))
    })?;
    let adapter = run.attach_adapter(&mut session.model, &cfg)?;
    let mut objective = DpoObjective {
        cfg: cfg.dpo,
        checkpointing: cfg.gradient_checkpointing,
        share_prefix: dpo.share_prefix,
        reference_cache: None,
    };
    if let Some(path) = &run.dump_first_step {
        let first = &examples.train[..cfg.batch_size];
        let rows = first.iter().map(|e| &e.chosen).chain(first.iter().map(|e| &e.rejected)).collect();
        dump_first_step(&session.model, &adapter, &objective, first, rows, session.tokenizer.pad_id, path)?;
        return Ok(None);
    }
    if dpo.precompute_reference {
        objective.reference_cache = Some(precompute_reference(&session.model, &objective, &examples.train)?);
    }
    train(run, "train-dpo", &session, &adapter, objective, examples, samples, cfg, group)
}

/// Fine-tunes an adapter on LLaVA-format conversations (STIC stage 2). Returns the run's summary on rank 0 (None
/// on the other ranks and after `dump_first_step`).
pub fn run_sft(run: &TrainRun) -> Result<Option<serde_json::Value>> {
    let cfg = run.config(STAGE2_DEFAULTS)?;
    let group = ProcessGroup::from_env()?;
    let mut session = run.load(&cfg, group.as_ref())?;
    let samples = run.sample_prompts(&session, group.as_ref())?;
    let read = |path: &Path| -> Result<Records<InstructionEntry>> {
        Ok(((1..).zip(load_instruction_data(path)?).collect(), Vec::new()))
    };
    let sets = run.split(&cfg, read)?;
    let (model, tokenizer) = (&session.model, &session.tokenizer);
    let examples = run.examples("conversations", &cfg, group.as_ref(), sets, |entry| {
        let turns = entry.training_turns()?;
        let (image, features) = match &entry.image {
            Some(name) if !cfg.text_only => {
                let (path, n) = run.image_features(model, name)?;
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
    let adapter = run.attach_adapter(&mut session.model, &cfg)?;
    let objective = SftObjective { checkpointing: cfg.gradient_checkpointing };
    if let Some(path) = &run.dump_first_step {
        let first = &examples.train[..cfg.batch_size];
        let rows = first.iter().map(|e| &e.row).collect();
        dump_first_step(&session.model, &adapter, &objective, first, rows, session.tokenizer.pad_id, path)?;
        return Ok(None);
    }
    train(run, "train-sft", &session, &adapter, objective, examples, samples, cfg, group)
}

/// Runs the trainer and, on rank 0, makes the summary.
#[allow(clippy::too_many_arguments)]
fn train<O: Objective>(
    run: &TrainRun,
    command: &str,
    session: &Session,
    adapter: &Adapter,
    objective: O,
    examples: Examples<O::Example>,
    samples: Option<SamplePrompts>,
    cfg: TrainConfig,
    group: Option<ProcessGroup>,
) -> Result<Option<serde_json::Value>> {
    let logging_dir = run.logging_dir.clone().unwrap_or_else(|| run.output.join("runs"));
    let sample_every = run.sample_every.unwrap_or_else(|| cfg.eval_every());
    let samples = samples.map(|prompts| {
        SampleWriter::new(session, prompts, cfg.template, sample_every, run.sample_max_new_tokens, &run.output)
    });
    let samples_path = samples.as_ref().map(|s| s.path().to_path_buf());
    let has_eval = !examples.eval.is_empty();
    let base_model = run.model_spec(&cfg).model.to_string();
    let mut trainer = Trainer {
        model: &session.model,
        adapter,
        objective,
        examples: examples.train,
        cfg,
        output: run.output.clone(),
        base_model,
        stop_after: run.stop_after_steps,
        group: group.as_ref(),
        eval_examples: examples.eval,
        logging_dir,
        samples,
    };
    let report = trainer.run(run.resume)?;
    let main = group.as_ref().is_none_or(|g| g.is_main());
    if let Some(group) = group {
        group.finish()?;
    }
    Ok(main.then(|| summary(&run.output, command, &report, examples.report, has_eval, samples_path)))
}

fn summary(
    output: &Path,
    command: &str,
    report: &RunReport,
    examples: serde_json::Value,
    has_eval: bool,
    samples: Option<PathBuf>,
) -> serde_json::Value {
    let out = |name: &str| output.join(name).display().to_string();
    let finished = report.steps == report.total_steps;
    let strip = |entry: &Option<serde_json::Map<String, serde_json::Value>>, prefix: &str| {
        entry.as_ref().map(|e| {
            e.iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                .collect::<serde_json::Map<_, _>>()
        })
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
            "adapter": finished.then(|| output.display().to_string()),
            "train_log": out("train_log.csv"),
            "eval_log": has_eval.then(|| out("eval_log.csv")),
            "trainer_state": out("trainer_state.json"),
            "tensorboard": report.logging_dir.as_ref().map(|d| d.display().to_string()),
            "curves": out(super::curves::FILE),
            "samples": samples.map(|p| p.display().to_string()),
        },
    })
}

/// The reference model's summed log-probs of each pair's (chosen, rejected) responses.
pub fn precompute_reference(
    model: &LlavaNext,
    objective: &DpoObjective,
    examples: &[PairExample],
) -> Result<Vec<(f64, f64)>> {
    let mut bar = crate::progress::Progress::new(examples.len() as u64, 0, "reference log-probs", "pairs", true);
    let mut out = Vec::with_capacity(examples.len());
    for e in examples {
        let batch = objective.pack(model, &[e])?;
        let image = e.image.as_deref().map(|path| PairImage::load(model, path)).transpose()?;
        let logps: Vec<f64> = Vec::try_from(
            objective
                .reference_logps(model, &batch, image.as_slice())?
                .to_kind(tch::Kind::Double)
                .to_device(tch::Device::Cpu),
        )
        .expect("f64");
        out.push((logps[0], logps[1]));
        bar.inc(1);
    }
    bar.finish();
    Ok(out)
}

/// Runs the first micro-batch and writes its loss, the same rows right-padded (as the reference implementations
/// take them) and the adapter's gradients and weights.
pub fn dump_first_step<O: Objective>(
    model: &LlavaNext,
    adapter: &Adapter,
    objective: &O,
    examples: &[O::Example],
    rows: Vec<&EncodedRow>,
    pad_id: i64,
    path: &Path,
) -> Result<()> {
    let picked: Vec<(usize, &O::Example)> = examples.iter().enumerate().collect();
    let out = objective.step(model, &picked, 1.0, 0)?;
    let (ids, mask, scored) = super::packing::padded(&rows, pad_id);
    let mut tensors = vec![
        ("loss".to_string(), tch::Tensor::from_slice(&[out.metrics[0]])),
        (
            "input_ids".to_string(),
            tch::Tensor::from_slice(&model.cfg.reference_ids(&Vec::<i64>::try_from(ids.flatten(0, 1))?)).view_as(&ids),
        ),
        ("attention_mask".to_string(), mask),
        ("scored".to_string(), scored),
    ];
    for (name, param) in adapter.parameters() {
        tensors.push((format!("grad.{name}"), param.grad()));
        tensors.push((format!("param.{name}"), param.detach()));
    }
    crate::model::weights::save_safetensors(path, &tensors)?;
    Ok(())
}
