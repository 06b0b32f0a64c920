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
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::optim::{clip_grad_norm, cosine_with_warmup, AdamW, AdamWConfig, ParamGroup};
use super::samples::SampleWriter;
use super::tracking::{ReportTo, Tracker, TrainRow, TrainerState};
use crate::dist::ProcessGroup;
use crate::error::{read_json, Error, Result};
use crate::fsutil::{create_dir, write_atomic, FolderLock};
use crate::image::{self, Preprocessed};
use crate::lora::{Adapter, LoraSettings};
use crate::model::weights::{save_safetensors, Checkpoint};
use crate::model::LlavaNext;
use crate::progress::Progress;

/// A token row for training: ids with image placeholders expanded, and which positions are scored.
#[derive(Debug, Clone)]
pub struct EncodedRow {
    pub ids: Vec<i64>,
    pub scored: Vec<bool>,
}

pub struct StepOutput {
    /// In the order of `Objective::metric_names`.
    pub metrics: Vec<f64>,
    pub tokens: usize,
}

pub trait Objective {
    type Example;
    fn metric_names(&self) -> &'static [&'static str];
    /// Tokens the model runs for this example (what a micro-batch costs).
    fn tokens(&self, example: &Self::Example) -> usize;
    /// Forward and backward over one micro-batch (gradients accumulate, the loss is multiplied by `loss_scale`).
    fn step(&self, model: &LlavaNext, examples: &[(usize, &Self::Example)], loss_scale: f64, seed: i64) -> Result<StepOutput>;
    /// Names of the held-out metrics `evaluate` gives.
    fn eval_metric_names(&self) -> &'static [&'static str];
    /// The same forward pass without gradients and with dropout off: the metrics of `eval_metric_names` summed
    /// over the micro-batch, and the weight they average by (pairs, scored tokens).
    fn evaluate(&self, model: &LlavaNext, examples: &[(usize, &Self::Example)]) -> Result<(Vec<f64>, f64)>;
}

pub fn load_preprocessed(model: &LlavaNext, path: &Path) -> Result<Preprocessed> {
    let img = image::load_image(path, model.cfg.image.max_pixels)?;
    Ok(image::preprocess(&img, &model.cfg.image))
}

/// Settings of a training run; `configs/*.yaml` hold them and command-line flags override them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub lora: LoraSettings,
    pub lr: f64,
    pub projector_lr: f64,
    pub epochs: f64,
    #[serde(default)]
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub max_length: usize,
    pub save_steps: usize,
    /// Steps between held-out evaluations (default: save_steps); there is one at the end too.
    #[serde(default)]
    pub eval_steps: Option<usize>,
    /// Steps whose metrics one log row averages.
    #[serde(default = "default_logging_steps")]
    pub logging_steps: usize,
    #[serde(default)]
    pub report_to: ReportTo,
    #[serde(default = "default_save_total_limit")]
    pub save_total_limit: usize,
    pub seed: u64,
    pub gradient_checkpointing: bool,
    pub template: crate::text::Template,
    #[serde(default = "default_auto")]
    pub dtype: String,
    #[serde(default = "default_auto")]
    pub device: String,
    #[serde(default)]
    pub dpo: super::dpo::DpoConfig,
    /// Prompts without `<image>` and no image features (the official stage 1: its stored prompts have none, so
    /// LLaVA drops the features).
    #[serde(default)]
    pub text_only: bool,
    /// How images become features (the official stage 2 uses `pad_flat`).
    #[serde(default)]
    pub image_layout: ImageLayout,
    /// Put `<image>` at the front of the message that holds it, on its own line (LLaVA's `preprocess_multimodal`).
    #[serde(default)]
    pub image_token_first: bool,
    /// LoRA dropout 0 whatever `lora.dropout` says (the official DPO trainer's `disable_dropout=True`).
    #[serde(default)]
    pub disable_dropout: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageLayout {
    /// As the model's config says (anyres for LLaVA-v1.6).
    #[default]
    Model,
    /// LLaVA's `image_aspect_ratio pad` + `mm_patch_merge_type flat`: the image padded to a square with the mean
    /// colour, one tile, its 576 features without `image_newline`.
    PadFlat,
}

fn default_logging_steps() -> usize {
    1
}

fn default_save_total_limit() -> usize {
    2
}

fn default_auto() -> String {
    "auto".into()
}

impl TrainConfig {
    pub fn from_yaml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_yaml::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
    }

    /// Settings that must not change between a run and its resumption.
    fn resume_signature(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        for volatile in ["save_steps", "save_total_limit", "device", "eval_steps", "logging_steps", "report_to"] {
            v.as_object_mut().expect("object").remove(volatile);
        }
        v
    }

    /// Steps between held-out evaluations.
    pub fn eval_every(&self) -> usize {
        self.eval_steps.unwrap_or(self.save_steps).max(1)
    }
}

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
        self.cfg.max_steps.unwrap_or(((self.examples.len() as f64 * self.cfg.epochs) / per_step as f64).ceil() as usize).max(1)
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
            groups.push(ParamGroup { params: self.adapter.projector_params.clone_handles(), lr: self.cfg.projector_lr });
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
        let mut tracker = if main {
            let (names, eval_names) = (self.objective.metric_names(), self.objective.eval_metric_names());
            Some(Tracker::open(&self.output, names, eval_names, self.cfg.report_to, &self.logging_dir, resumed.as_ref())?)
        } else {
            None
        };
        if let Some(samples) = self.samples.as_mut() {
            samples.open(start)?;
        }
        let mut progress = Progress::new(total as u64, start as u64, "step", "steps", main);
        let (rank, world) = crate::dist::rank_and_world(self.group);
        let (n, global) = (self.examples.len(), self.global_batch());
        let tokens_of: Vec<usize> = self.examples.iter().map(|e| self.objective.tokens(e)).collect();
        let mut orders: std::collections::HashMap<usize, Vec<usize>> = Default::default();
        let end = self.stop_after.map_or(total, |s| (start + s).min(total));
        // Example positions in the seeded stream of epochs that the run takes (all it needs with max_steps).
        let positions = if self.cfg.max_steps.is_some() { usize::MAX } else { (n as f64 * self.cfg.epochs).ceil() as usize };
        let logging_steps = self.cfg.logging_steps.max(1);
        // The steps since the last log row: their metrics (summed), tokens and seconds.
        let mut window = (vec![0.0; self.objective.metric_names().len()], 0usize, 0usize, 0.0f64);
        let mut run_tokens = 0;
        for step in start..end {
            let started = Instant::now();
            let mut sums = vec![0.0; self.objective.metric_names().len()];
            let mut tokens = 0;
            // The step's examples, dealt into micro-batches (of all ranks) with even token counts. The run's last
            // step holds what is left of its epochs (as transformers' Trainer: no example twice in one epoch).
            let batch: Vec<usize> = (step * global..((step + 1) * global).min(positions))
                .map(|p| orders.entry(p / n).or_insert_with(|| self.order(p / n))[p % n])
                .collect();
            let chunks = even_chunks(&batch, &tokens_of, world * self.cfg.grad_accum);
            let mine = |micro: usize| &chunks[micro * world + rank];
            let empty_rank = (0..self.cfg.grad_accum).all(|micro| mine(micro).is_empty());
            for micro in 0..self.cfg.grad_accum {
                // Each example's loss weighs 1/(examples in the step) after the mean over ranks. A rank left without
                // an example runs one with weight 0, so that its gradients exist as on the other ranks.
                let (picked, weight): (Vec<(usize, &O::Example)>, f64) = match (mine(micro).is_empty(), empty_rank && micro == 0) {
                    (false, _) => (mine(micro).iter().map(|&i| (i, &self.examples[i])).collect(), (mine(micro).len() * world) as f64 / batch.len() as f64),
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
                for (s, m) in sums.iter_mut().zip(&out.metrics) {
                    *s += m * weight;
                }
                if weight > 0.0 {
                    tokens += out.tokens;
                }
            }
            if let Some(group) = self.group {
                let grads: Vec<Tensor> = optimizer.parameters().map(|p| p.grad()).filter(|g| g.defined()).collect();
                group.all_reduce_mean_bucketed(&grads)?;
                // Metrics: the mean over ranks; tokens: the sum.
                let mut values = sums.iter().map(|v| v / world as f64).collect::<Vec<_>>();
                values.push(tokens as f64);
                let reduced = group.all_reduce_sum_f64(&values)?;
                let n = sums.len();
                sums.copy_from_slice(&reduced[..n]);
                tokens = reduced[n] as usize;
            }
            let grad_norm = clip_grad_norm(optimizer.parameters(), self.cfg.max_grad_norm);
            let factor = cosine_with_warmup(step, warmup, total);
            optimizer.step(factor);
            optimizer.zero_grad();
            if !optimizer.parameters().all(|p| bool::try_from(p.isfinite().all()).unwrap_or(false)) {
                return Err(Error::Training(format!(
                    "the update of step {} made the weights non-finite (gradient norm {grad_norm:.3e}); nothing of it was \
                     saved, {}: lower the learning rate",
                    step + 1,
                    self.last_good_checkpoint()
                )));
            }
            let done = step + 1;
            let epoch = (done * global) as f64 / n as f64;
            run_tokens += tokens;
            window.0.iter_mut().zip(&sums).for_each(|(w, s)| *w += s);
            window.1 += 1;
            window.2 += tokens;
            window.3 += started.elapsed().as_secs_f64();
            if let Some(tracker) = tracker.as_mut().filter(|_| done % logging_steps == 0 || done == end) {
                let metrics: Vec<f64> = window.0.iter().map(|s| s / window.1 as f64).collect();
                let row = TrainRow {
                    step: done,
                    epoch,
                    metric_names: self.objective.metric_names(),
                    metrics: &metrics,
                    grad_norm,
                    learning_rate: self.cfg.lr * factor,
                    tokens_per_s: window.2 as f64 / window.3,
                };
                tracker.log_train(&row)?;
                window = (vec![0.0; metrics.len()], 0, 0, 0.0);
            }
            progress.set_message(format!("loss {:.4}", sums[0]));
            progress.inc(1);
            if !self.eval_examples.is_empty() && (done % self.cfg.eval_every() == 0 || done == total) {
                let values = self.evaluate()?;
                if let Some(tracker) = tracker.as_mut() {
                    tracker.log_eval(done, epoch, self.objective.eval_metric_names(), &values)?;
                }
            }
            if let Some(samples) = self.samples.as_mut().filter(|s| done % s.every == 0 || done == total) {
                samples.write(done)?;
            }
            if done % self.cfg.save_steps.max(1) == 0 || done == total {
                if let Some(tracker) = tracker.as_mut() {
                    self.save_checkpoint(done, total, epoch, &optimizer, tracker)?;
                    self.write_records(done, total, epoch, tracker)?;
                }
                self.barrier()?;
            }
        }
        progress.finish();
        let epoch = (end * global) as f64 / n as f64;
        if let Some(tracker) = tracker.as_mut() {
            if end == total {
                self.adapter.save(&self.output, &self.base_model)?;
            }
            // (a run that ended on a save wrote them there)
            let saved_at_end = end > start && (end % self.cfg.save_steps.max(1) == 0 || end == total);
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
        write_atomic(&self.output.join("trainer_state.json"), serde_json::to_string_pretty(&state).expect("json").as_bytes())?;
        super::curves::draw(&self.output.join(super::curves::FILE), &tracker.history)
    }

    /// Where a run that stops on bad numbers can be resumed from, for its message.
    fn last_good_checkpoint(&self) -> String {
        let root = checkpoints_dir(&self.output);
        match std::fs::read_to_string(root.join(LATEST)) {
            Ok(latest) => format!("the last good checkpoint is {} (--resume continues from it)", root.join(latest.trim()).display()),
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

    fn save_checkpoint(&self, step: usize, total: usize, epoch: f64, optimizer: &AdamW, tracker: &mut Tracker) -> Result<()> {
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
            write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(&state).expect("json").as_bytes())
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
        let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("step-")).collect();
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
            Error::Input(format!("--resume: no checkpoint in {} (nothing to resume; run without --resume)", root.display()))
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
        let c = (0..chunks).filter(|&c| out[c].len() < per_chunk).min_by_key(|&c| totals[c]).expect("a chunk with room");
        out[c].push(i);
        totals[c] += tokens[i];
    }
    out
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
