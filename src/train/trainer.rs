//! The training loop shared by DPO and SFT: LoRA (+ projector) with AdamW, warm-up and cosine decay, gradient
//! accumulation and clipping, crash-safe checkpoints that resume bit for bit, held-out evaluation, samples, and the
//! records of `tracking` (CSV logs, TensorBoard, trainer_state.json, train_curves.png) with progress on stderr.
//!
//! Data-parallel under torchrun (`group`): `batch_size` is per rank, so a step sees world × batch_size × grad_accum
//! examples: the step's consecutive stream positions, dealt into world × grad_accum micro-batches of even token
//! counts (`even_chunks`), micro-batch m of rank r being chunk m × world + r; the gradients are averaged across ranks before clipping, metrics are averaged across ranks, and only rank 0 writes
//! the log, checkpoints and the adapter. Rank 0 also restores a checkpoint and sends it to the others.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::config::TrainConfig;
use super::objective::Objective;
use super::optim::{all_finite, clip_grad_norm, cosine_with_warmup, AdamW, AdamWConfig, ParamGroup};
use super::samples::SampleWriter;
use super::tracking::{Tracker, TrainRow, TrainerState};
use crate::adapter::Adapter;
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};
use crate::fsutil::read_json;
use crate::fsutil::{create_dir, write_atomic, FolderLock};
use crate::model::weights::{save_safetensors, Checkpoint};
use crate::model::LlavaNext;
use crate::progress::Progress;

/// What a finished (or stopped) run did, for its summary.
pub struct RunReport {
    /// The step the run ended at, and the one it started from (a resumed run).
    pub steps: usize,
    pub start_step: usize,
    pub total_steps: usize,
    pub epochs: f64,
    pub seconds: f64,
    /// Tokens of this run's steps (over all ranks).
    pub tokens: usize,
    pub logging_dir: Option<PathBuf>,
    /// The last entries of the log history with train and with eval metrics.
    pub last_train: Option<serde_json::Map<String, serde_json::Value>>,
    pub last_eval: Option<serde_json::Map<String, serde_json::Value>>,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<String>,
}

pub struct Trainer<'a, O: Objective> {
    pub model: &'a LlavaNext,
    pub adapter: &'a Adapter,
    pub objective: O,
    pub examples: Vec<O::Example>,
    pub cfg: TrainConfig,
    pub output: PathBuf,
    pub base_model: String,
    /// Stop (as if interrupted) after this many optimizer steps of the run.
    pub stop_after: Option<usize>,
    /// The data-parallel group (torchrun); None for a single process.
    pub group: Option<&'a ProcessGroup>,
    /// Held-out examples, evaluated every `eval_steps` and at the end (none: no evaluation).
    pub eval_examples: Vec<O::Example>,
    /// Where the TensorBoard event files go.
    pub logging_dir: PathBuf,
    /// Generations written every few steps (rank 0 only).
    pub samples: Option<SampleWriter<'a>>,
}

const LATEST: &str = "latest";

fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

impl<'a, O: Objective> Trainer<'a, O> {
    fn world_size(&self) -> usize {
        self.group.map_or(1, |g| g.world_size())
    }

    fn is_main(&self) -> bool {
        self.group.is_none_or(|g| g.is_main())
    }

    /// Examples per optimizer step, over all ranks.
    pub fn global_batch(&self) -> usize {
        self.world_size() * self.cfg.batch_size * self.cfg.grad_accum
    }

    pub fn total_steps(&self) -> usize {
        let per_step = self.global_batch();
        self.cfg
            .max_steps
            .unwrap_or(((self.examples.len() as f64 * self.cfg.epochs) / per_step as f64).ceil() as usize)
            .max(1)
    }

    /// The example order of one epoch (epochs follow each other in the stream, each in its own seeded order).
    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.cfg.seed.wrapping_add(epoch as u64 * 7919));
        order.shuffle(&mut rng);
        order
    }

    fn optimizer(&self) -> AdamW {
        let mut groups = vec![ParamGroup { params: self.adapter.lora_params.clone_handles(), lr: self.cfg.lr }];
        if !self.adapter.projector_params.is_empty() {
            groups
                .push(ParamGroup { params: self.adapter.projector_params.clone_handles(), lr: self.cfg.projector_lr });
        }
        AdamW::new(AdamWConfig { weight_decay: self.cfg.weight_decay, ..Default::default() }, groups)
    }

    pub fn run(&mut self, resume: bool) -> Result<RunReport> {
        let main = self.is_main();
        // A second run into the same folder would overwrite this one's checkpoints and adapter.
        let _lock = if main { Some(FolderLock::acquire(&self.output, "--output")?) } else { None };
        let started_run = Instant::now();
        let total = self.total_steps();
        let warmup = (self.cfg.warmup_ratio * total as f64).ceil() as usize;
        let mut optimizer = self.optimizer();
        let resumed = if resume && main { Some(self.restore(&mut optimizer)?) } else { None };
        let start = self.sync_start(resumed.as_ref().map_or(0, |s| s.global_step), &mut optimizer)?;
        let mut tracker = if main { Some(self.open_tracker(resumed.as_ref())?) } else { None };
        if let Some(samples) = self.samples.as_mut() {
            samples.open(start)?;
        }
        let mut progress = Progress::new(total as u64, start as u64, "step", "steps", main);
        let (n, global) = (self.examples.len(), self.global_batch());
        let mut stream = ExampleStream::new(self);
        let end = self.stop_after.map_or(total, |s| (start + s).min(total));
        let logging_steps = self.cfg.logging_steps.max(1);
        let mut window = LogWindow::new(self.objective.metric_names().len());
        let mut run_tokens = 0;
        for step in start..end {
            let started = Instant::now();
            let batch = stream.batch(self, step);
            let mut totals = self.micro_batches(step, &batch, &stream.tokens)?;
            self.reduce_across_ranks(&optimizer, &mut totals)?;
            let grad_norm = clip_grad_norm(optimizer.parameters(), self.cfg.max_grad_norm);
            let factor = cosine_with_warmup(step, warmup, total);
            optimizer.step(factor);
            optimizer.zero_grad();
            if !all_finite(optimizer.parameters()) {
                return Err(Error::Training(format!(
                    "the update of step {} made the weights non-finite (gradient norm {grad_norm:.3e}); nothing of it was \
                     saved, {}: lower the learning rate",
                    step + 1,
                    self.last_good_checkpoint()
                )));
            }
            run_tokens += totals.tokens;
            window.add(&totals, started.elapsed().as_secs_f64());
            let done = StepDone {
                step: step + 1,
                epoch: ((step + 1) * global) as f64 / n as f64,
                grad_norm,
                learning_rate: self.cfg.lr * factor,
                loss: totals.metrics[0],
            };
            if let Some(tracker) =
                tracker.as_mut().filter(|_| done.step.is_multiple_of(logging_steps) || done.step == end)
            {
                self.log_train(tracker, &done, &mut window)?;
            }
            progress.set_message(format!("loss {:.4}", done.loss));
            progress.inc(1);
            self.evaluate_sample_save(&done, total, &optimizer, tracker.as_mut())?;
        }
        progress.finish();
        let epoch = (end * global) as f64 / n as f64;
        if let Some(tracker) = tracker.as_mut() {
            if end == total {
                self.adapter.save(&self.output, &self.base_model)?;
            }
            // (a run that ended on a save wrote them there)
            let saved_at_end = end > start && (end.is_multiple_of(self.cfg.save_steps.max(1)) || end == total);
            if !saved_at_end {
                self.write_records(end, total, epoch, tracker)?;
            }
        }
        if end == total {
            self.barrier()?;
        }
        Ok(RunReport {
            steps: end,
            start_step: start,
            total_steps: total,
            epochs: epoch,
            seconds: started_run.elapsed().as_secs_f64(),
            tokens: run_tokens,
            logging_dir: tracker.as_ref().and_then(|t| t.logging_dir.clone()),
            last_train: tracker.as_ref().and_then(|t| t.last_with("loss").cloned()),
            last_eval: tracker.as_ref().and_then(|t| t.last_with("eval_loss").cloned()),
            best_metric: tracker.as_ref().and_then(|t| t.best.map(|(v, _)| v)),
            best_model_checkpoint: tracker.as_ref().and_then(|t| t.best_checkpoint.clone()),
        })
    }

    fn open_tracker(&self, resumed: Option<&TrainerState>) -> Result<Tracker> {
        let (names, eval_names) = (self.objective.metric_names(), self.objective.eval_metric_names());
        Tracker::open(&self.output, names, eval_names, self.cfg.report_to, &self.logging_dir, resumed)
    }

    /// Runs this rank's micro-batches of one step (`batch`: the step's examples over all ranks), accumulating
    /// their gradients; returns their weighted metrics and tokens.
    fn micro_batches(&self, step: usize, batch: &[usize], tokens_of: &[usize]) -> Result<StepTotals> {
        let (rank, world) = crate::dist::rank_and_world(self.group);
        let mut totals = StepTotals { metrics: vec![0.0; self.objective.metric_names().len()], tokens: 0 };
        // The step's examples, dealt into micro-batches (of all ranks) with even token counts.
        let loss_tokens = |i: usize| self.objective.loss_tokens(&self.examples[i]);
        let (chunks, shares) = weighted_chunks(
            batch,
            tokens_of,
            world * self.cfg.grad_accum,
            self.cfg.pooled_device_batch(),
            loss_tokens,
        )?;
        let mine = |micro: usize| &chunks[micro * world + rank];
        let empty_rank = (0..self.cfg.grad_accum).all(|micro| mine(micro).is_empty());
        for micro in 0..self.cfg.grad_accum {
            // Each example's loss weighs 1/(examples in the step) after the mean over ranks. A rank left without
            // an example runs one with weight 0, so that its gradients exist as on the other ranks.
            let (picked, weight): (Vec<(usize, &O::Example)>, f64) =
                match (mine(micro).is_empty(), empty_rank && micro == 0) {
                    (false, _) => (
                        mine(micro).iter().map(|&i| (i, &self.examples[i])).collect(),
                        shares[micro * world + rank] * world as f64,
                    ),
                    (true, true) => (vec![(batch[0], &self.examples[batch[0]])], 0.0),
                    (true, false) => continue,
                };
            let seed = (self.cfg.seed as i64)
                .wrapping_mul(1_000_000_007)
                .wrapping_add((step * self.cfg.grad_accum + micro) as i64)
                .wrapping_add((rank as i64) << 32);
            let out = self.objective.step(self.model, &picked, weight, seed).map_err(|e| match e {
                Error::Training(why) => Error::Training(format!(
                    "{why} at step {} (records {:?}); {}: lower the learning rate or check those records",
                    step + 1,
                    picked.iter().map(|(i, _)| i).collect::<Vec<_>>(),
                    self.last_good_checkpoint()
                )),
                other => other,
            })?;
            for (s, m) in totals.metrics.iter_mut().zip(&out.metrics) {
                *s += m * weight;
            }
            if weight > 0.0 {
                totals.tokens += out.tokens;
            }
        }
        Ok(totals)
    }

    /// Under torchrun: averages the gradients and the metrics over the ranks and sums their tokens.
    fn reduce_across_ranks(&self, optimizer: &AdamW, totals: &mut StepTotals) -> Result<()> {
        let Some(group) = self.group else { return Ok(()) };
        let world = group.world_size();
        let grads: Vec<Tensor> = optimizer.parameters().map(|p| p.grad()).filter(|g| g.defined()).collect();
        group.all_reduce_mean_bucketed(&grads)?;
        let mut values = totals.metrics.iter().map(|v| v / world as f64).collect::<Vec<_>>();
        values.push(totals.tokens as f64);
        let reduced = group.all_reduce_sum_f64(&values)?;
        let n = totals.metrics.len();
        totals.metrics.copy_from_slice(&reduced[..n]);
        totals.tokens = reduced[n] as usize;
        Ok(())
    }

    /// Writes the log row of the steps in `window` (their mean metrics) and starts a new window.
    fn log_train(&self, tracker: &mut Tracker, done: &StepDone, window: &mut LogWindow) -> Result<()> {
        let metrics: Vec<f64> = window.metrics.iter().map(|s| s / window.steps as f64).collect();
        let row = TrainRow {
            step: done.step,
            epoch: done.epoch,
            metric_names: self.objective.metric_names(),
            metrics: &metrics,
            grad_norm: done.grad_norm,
            learning_rate: done.learning_rate,
            tokens_per_s: window.tokens as f64 / window.seconds,
        };
        tracker.log_train(&row)?;
        *window = LogWindow::new(metrics.len());
        Ok(())
    }

    /// After a step: the held-out evaluation, the samples and the checkpoint that are due.
    fn evaluate_sample_save(
        &mut self,
        done: &StepDone,
        total: usize,
        optimizer: &AdamW,
        mut tracker: Option<&mut Tracker>,
    ) -> Result<()> {
        let step = done.step;
        if !self.eval_examples.is_empty() && (step.is_multiple_of(self.cfg.eval_every()) || step == total) {
            let values = self.evaluate()?;
            if let Some(tracker) = tracker.as_mut() {
                tracker.log_eval(step, done.epoch, self.objective.eval_metric_names(), &values)?;
            }
        }
        if let Some(samples) = self.samples.as_mut().filter(|s| step.is_multiple_of(s.every) || step == total) {
            samples.write(step)?;
        }
        if step.is_multiple_of(self.cfg.save_steps.max(1)) || step == total {
            if let Some(tracker) = tracker {
                self.save_checkpoint(step, total, done.epoch, optimizer, tracker)?;
                self.write_records(step, total, done.epoch, tracker)?;
            }
            self.barrier()?;
        }
        Ok(())
    }

    /// The held-out metrics: each rank evaluates every world-th micro-batch, the sums are added over ranks.
    fn evaluate(&self) -> Result<Vec<f64>> {
        let (rank, world) = crate::dist::rank_and_world(self.group);
        let names = self.objective.eval_metric_names();
        let mut sums = vec![0.0; names.len() + 1];
        let indexed: Vec<(usize, &O::Example)> = self.eval_examples.iter().enumerate().collect();
        for chunk in indexed.chunks(self.cfg.batch_size.max(1)).skip(rank).step_by(world) {
            let (values, weight) = self.objective.evaluate(self.model, chunk)?;
            sums.iter_mut().zip(values.iter().chain([&weight])).for_each(|(s, v)| *s += v);
        }
        if let Some(group) = self.group {
            sums = group.all_reduce_sum_f64(&sums)?;
        }
        let weight = sums.pop().expect("the weight").max(f64::MIN_POSITIVE);
        Ok(sums.into_iter().map(|s| s / weight).collect())
    }

    fn state(&self, step: usize, total: usize, epoch: f64, tracker: &Tracker) -> TrainerState {
        TrainerState {
            best_global_step: tracker.best.map(|(_, s)| s),
            best_metric: tracker.best.map(|(v, _)| v),
            best_model_checkpoint: tracker.best_checkpoint.clone(),
            epoch,
            eval_steps: self.cfg.eval_every(),
            global_step: step,
            log_history: tracker.history.clone(),
            logging_steps: self.cfg.logging_steps,
            max_steps: total,
            num_train_epochs: total as f64 * self.global_batch() as f64 / self.examples.len() as f64,
            save_steps: self.cfg.save_steps,
            train_batch_size: self.cfg.batch_size,
            config: self.cfg.resume_signature(),
        }
    }

    /// trainer_state.json and train_curves.png in the output folder, as they stand at `step`.
    fn write_records(&self, step: usize, total: usize, epoch: f64, tracker: &Tracker) -> Result<()> {
        let state = self.state(step, total, epoch, tracker);
        write_atomic(
            &self.output.join("trainer_state.json"),
            serde_json::to_string_pretty(&state).expect("json").as_bytes(),
        )?;
        super::curves::draw(&self.output.join(super::curves::FILE), &tracker.history)
    }

    /// Where a run that stops on bad numbers can be resumed from, for its message.
    fn last_good_checkpoint(&self) -> String {
        let root = checkpoints_dir(&self.output);
        match std::fs::read_to_string(root.join(LATEST)) {
            Ok(latest) => format!(
                "the last good checkpoint is {} (--resume continues from it)",
                root.join(latest.trim()).display()
            ),
            Err(_) => "there is no checkpoint yet".into(),
        }
    }

    /// Waits for the other ranks (after rank 0 wrote something), so that none runs ahead of a save that fails.
    fn barrier(&self) -> Result<()> {
        self.group.map_or(Ok(()), |g| g.barrier())
    }

    /// Gives every rank rank 0's step, adapter and optimizer state (restored from a checkpoint or freshly
    /// made), so that all ranks start from the same point without reading rank 0's files.
    fn sync_start(&self, start: usize, optimizer: &mut AdamW) -> Result<usize> {
        let Some(group) = self.group else { return Ok(start) };
        let step = Tensor::from_slice(&[start as i64]);
        group.broadcast(&step, 0)?;
        let start = step.int64_value(&[0]) as usize;
        tch::no_grad(|| -> Result<()> {
            for (_, param) in self.adapter.parameters() {
                group.broadcast(param, 0)?;
            }
            for (_, m, v) in &optimizer.state {
                group.broadcast(m, 0)?;
                group.broadcast(v, 0)?;
            }
            Ok(())
        })?;
        optimizer.steps = start as i64;
        Ok(start)
    }

    fn save_checkpoint(
        &self,
        step: usize,
        total: usize,
        epoch: f64,
        optimizer: &AdamW,
        tracker: &mut Tracker,
    ) -> Result<()> {
        let root = checkpoints_dir(&self.output);
        create_dir(&root)?;
        let name = format!("step-{step:06}");
        tracker.saved_checkpoint(step, &root.join(&name));
        let tmp = root.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        let write = || -> Result<()> {
            self.adapter.save(&tmp, &self.base_model)?;
            let mut moments = Vec::new();
            for (param, m, v) in &optimizer.state {
                moments.push((format!("exp_avg.{param}"), m.to_device(Device::Cpu)));
                moments.push((format!("exp_avg_sq.{param}"), v.to_device(Device::Cpu)));
            }
            save_safetensors(&tmp.join("optimizer.safetensors"), &moments)?;
            let state = self.state(step, total, epoch, tracker);
            write_atomic(
                &tmp.join("trainer_state.json"),
                serde_json::to_string_pretty(&state).expect("json").as_bytes(),
            )
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dir = root.join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        write_atomic(&root.join(LATEST), name.as_bytes())?;
        self.prune_checkpoints(&root, &name);
        Ok(())
    }

    fn prune_checkpoints(&self, root: &Path, keep_latest: &str) {
        let Ok(entries) = std::fs::read_dir(root) else { return };
        let mut names: Vec<String> =
            entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("step-")).collect();
        names.sort();
        let excess = names.len().saturating_sub(self.cfg.save_total_limit.max(1));
        for old in names.iter().take(excess).filter(|n| n.as_str() != keep_latest) {
            let _ = std::fs::remove_dir_all(root.join(old));
        }
    }

    /// Loads the latest checkpoint into the adapter and optimizer; returns its state (the step to continue
    /// from, the log history up to it).
    fn restore(&self, optimizer: &mut AdamW) -> Result<TrainerState> {
        let root = checkpoints_dir(&self.output);
        let latest = std::fs::read_to_string(root.join(LATEST)).map_err(|_| {
            Error::Input(format!(
                "--resume: no checkpoint in {} (nothing to resume; run without --resume)",
                root.display()
            ))
        })?;
        let dir = root.join(latest.trim());
        let state: TrainerState = read_json(&dir.join("trainer_state.json"))?;
        if state.config != self.cfg.resume_signature() {
            return Err(Error::Input(format!(
                "--resume: the settings differ from those of the checkpoint in {}; resume with the same config and flags",
                dir.display()
            )));
        }
        let adapter = Checkpoint::open_files(&[dir.join("adapter_model.safetensors")])?;
        let moments = Checkpoint::open_files(&[dir.join("optimizer.safetensors")])?;
        tch::no_grad(|| -> Result<()> {
            for (name, param) in self.adapter.parameters() {
                param.shallow_clone().copy_(&adapter.load_raw(name, Kind::Float, param.device())?);
            }
            for (name, m, v) in optimizer.state.iter_mut() {
                m.copy_(&moments.load_raw(&format!("exp_avg.{name}"), Kind::Float, m.device())?);
                v.copy_(&moments.load_raw(&format!("exp_avg_sq.{name}"), Kind::Float, v.device())?);
            }
            Ok(())
        })?;
        optimizer.steps = state.global_step as i64;
        Ok(state)
    }
}

/// The seeded stream of example positions a run takes: epoch after epoch, each in its own seeded order.
struct ExampleStream {
    /// The order of each epoch reached so far.
    orders: HashMap<usize, Vec<usize>>,
    /// Example positions in the stream that the run takes (all it needs with max_steps).
    positions: usize,
    /// Tokens of each example, for dealing a step's examples into even micro-batches.
    tokens: Vec<usize>,
}

impl ExampleStream {
    fn new<O: Objective>(trainer: &Trainer<O>) -> Self {
        let (n, cfg) = (trainer.examples.len(), &trainer.cfg);
        ExampleStream {
            orders: HashMap::new(),
            positions: if cfg.max_steps.is_some() { usize::MAX } else { (n as f64 * cfg.epochs).ceil() as usize },
            tokens: trainer.examples.iter().map(|e| trainer.objective.tokens(e)).collect(),
        }
    }

    /// The examples of one step over all ranks. The run's last step holds what is left of its epochs (as
    /// transformers' Trainer: no example twice in one epoch).
    fn batch<O: Objective>(&mut self, trainer: &Trainer<O>, step: usize) -> Vec<usize> {
        let (n, global) = (trainer.examples.len(), trainer.global_batch());
        (step * global..((step + 1) * global).min(self.positions))
            .map(|p| self.orders.entry(p / n).or_insert_with(|| trainer.order(p / n))[p % n])
            .collect()
    }
}

/// One step's metrics (weighted by the examples' share of the step) and tokens: of this rank's micro-batches,
/// over all ranks once reduced.
struct StepTotals {
    metrics: Vec<f64>,
    tokens: usize,
}

/// The steps since the last log row: their metrics (summed), tokens and seconds.
struct LogWindow {
    metrics: Vec<f64>,
    steps: usize,
    tokens: usize,
    seconds: f64,
}

impl LogWindow {
    fn new(metrics: usize) -> Self {
        LogWindow { metrics: vec![0.0; metrics], steps: 0, tokens: 0, seconds: 0.0 }
    }

    fn add(&mut self, step: &StepTotals, seconds: f64) {
        self.metrics.iter_mut().zip(&step.metrics).for_each(|(w, s)| *w += s);
        self.steps += 1;
        self.tokens += step.tokens;
        self.seconds += seconds;
    }
}

/// A finished optimizer step, as it is logged.
struct StepDone {
    /// Steps done (the step's number counted from 1).
    step: usize,
    epoch: f64,
    grad_norm: f64,
    learning_rate: f64,
    loss: f64,
}

/// Splits `batch` into `chunks` chunks of equal size (sizes one apart when they cannot be equal) with token totals as even as a greedy deal makes them
/// (LLaVA's `split_to_even_chunks`, what the official scripts' `group_by_modality_length` does within a global
/// batch): longest first, each to the chunk with the fewest tokens that still has room.
fn even_chunks(batch: &[usize], tokens: &[usize], chunks: usize) -> Vec<Vec<usize>> {
    // the last step of a run can hold fewer examples than the global batch: the first chunks get one more
    let per_chunk = batch.len().div_ceil(chunks);
    let mut by_length = batch.to_vec();
    by_length.sort_by_key(|&i| std::cmp::Reverse(tokens[i]));
    let mut out = vec![Vec::with_capacity(per_chunk); chunks];
    let mut totals = vec![0usize; chunks];
    for i in by_length {
        let c =
            (0..chunks).filter(|&c| out[c].len() < per_chunk).min_by_key(|&c| totals[c]).expect("a chunk with room");
        out[c].push(i);
        totals[c] += tokens[i];
    }
    out
}

/// The step's micro-batches and each one's share of the step's loss (before the mean over ranks). Without
/// `device_batch`: even chunks, each weighing its examples' share. With `device_batch` n: the step's runs of n consecutive examples,
/// each dealt into its own chunks, a chunk weighing its scored tokens over its run's times the runs' count, so
/// that the chunks' token means add up to the mean over runs of each run's pooled token mean.
fn weighted_chunks(
    batch: &[usize],
    tokens: &[usize],
    chunks: usize,
    device_batch: Option<usize>,
    loss_tokens: impl Fn(usize) -> Option<usize>,
) -> Result<(Vec<Vec<usize>>, Vec<f64>)> {
    let Some(device_batch) = device_batch else {
        let dealt = even_chunks(batch, tokens, chunks);
        let shares = dealt.iter().map(|c| c.len() as f64 / batch.len() as f64).collect();
        return Ok((dealt, shares));
    };
    let runs: Vec<&[usize]> = batch.chunks(device_batch.max(1)).collect();
    let scored = |i: usize| {
        loss_tokens(i).ok_or_else(|| {
            Error::Input("loss_weighting device_batch weighs token losses: it applies to SFT (train-sft) only".into())
        })
    };
    let (mut dealt, mut shares) = (Vec::with_capacity(chunks), Vec::with_capacity(chunks));
    for (r, run) in runs.iter().enumerate() {
        // the run's part of the chunks: the first runs take one more when they do not divide evenly
        let count = chunks / runs.len() + usize::from(r < chunks % runs.len());
        let run_tokens: usize = run.iter().map(|&i| scored(i)).sum::<Result<usize>>()?;
        for chunk in even_chunks(run, tokens, count) {
            let chunk_tokens: usize = chunk.iter().map(|&i| scored(i)).sum::<Result<usize>>()?;
            shares.push(chunk_tokens as f64 / (run_tokens.max(1) * runs.len()) as f64);
            dealt.push(chunk);
        }
    }
    Ok((dealt, shares))
}

/// Refuses fewer examples than a run needs: one per rank, or a full micro-batch for `--dump-first-step`.
pub fn check_enough_examples(examples: usize, needed: usize, what: &str) -> Result<()> {
    if examples < needed {
        return Err(Error::Input(format!(
            "{examples} {what} are fewer than the {needed} this run needs (one per rank; a full --batch-size with \
             --dump-first-step): give more data or use fewer ranks"
        )));
    }
    Ok(())
}

trait CloneHandles {
    fn clone_handles(&self) -> Vec<(String, Tensor)>;
}

impl CloneHandles for Vec<(String, Tensor)> {
    fn clone_handles(&self) -> Vec<(String, Tensor)> {
        self.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_batch_weighting_is_the_pooled_token_mean_of_each_device_batch() {
        // 32 examples of uneven lengths: scored tokens and summed negative log-likelihoods
        let scored: Vec<usize> = (0..32).map(|i| 5 + (i * 37) % 23).collect();
        let nll: Vec<f64> = (0..32).map(|i| scored[i] as f64 * (1.0 + (i % 7) as f64 * 0.3)).collect();
        let tokens: Vec<usize> = scored.iter().map(|s| s + 40).collect();
        let batch: Vec<usize> = (0..32).rev().collect();
        // each chunk's token mean times its share, as the trainer's micro-batches add up
        let loss = |weighting| {
            let (chunks, shares) = weighted_chunks(&batch, &tokens, 8, weighting, |i| Some(scored[i])).unwrap();
            assert_eq!(chunks.len(), 8);
            let mut all: Vec<usize> = chunks.concat();
            all.sort();
            assert_eq!(all, (0..32).collect::<Vec<_>>());
            chunks
                .iter()
                .zip(shares)
                .map(|(c, share)| {
                    let mean =
                        c.iter().map(|&i| nll[i]).sum::<f64>() / c.iter().map(|&i| scored[i]).sum::<usize>() as f64;
                    mean * share
                })
                .sum::<f64>()
        };
        // transformers' Trainer at 16 per device: each device batch's tokens pooled, the devices averaged
        let pooled = |run: &[usize]| {
            run.iter().map(|&i| nll[i]).sum::<f64>() / run.iter().map(|&i| scored[i]).sum::<usize>() as f64
        };
        let direct = (pooled(&batch[..16]) + pooled(&batch[16..])) / 2.0;
        assert!((loss(Some(16)) - direct).abs() < 1e-12);
        let whole = pooled(&batch);
        assert!((loss(Some(32)) - whole).abs() < 1e-12);
        // the micro-batch weighting is another number on uneven rows
        assert!((loss(None) - direct).abs() > 1e-6);
        let refused = weighted_chunks(&batch, &tokens, 8, Some(16), |_| None);
        assert!(refused.unwrap_err().to_string().contains("SFT"));
    }

    #[test]
    fn even_chunks_balance_tokens_and_keep_every_example_once() {
        let tokens = [100, 10, 90, 20, 50, 50, 60, 40];
        let chunks = even_chunks(&(0..8).collect::<Vec<_>>(), &tokens, 4);
        assert!(chunks.iter().all(|c| c.len() == 2));
        let totals: Vec<usize> = chunks.iter().map(|c| c.iter().map(|&i| tokens[i]).sum()).collect();
        assert_eq!(totals, vec![110, 110, 100, 100]);
        let mut all: Vec<usize> = chunks.concat();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert_eq!(even_chunks(&[3, 1], &tokens, 1), vec![vec![3, 1]]);
        let partial = even_chunks(&[0, 1, 2], &tokens, 8);
        assert_eq!(partial.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1, 0, 0, 0, 0, 0]);
    }
}
