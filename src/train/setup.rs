//! What a `train-dpo` or `train-sft` run is given, and how it gets ready: the config with the flags applied, the
//! model, the training and held-out records (`--eval-data` or a `--val-fraction` split) and their examples.
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::{ImageLayout, Overrides, TrainConfig};
use super::data::{image_path, image_size, Records};
use super::samples::SamplePrompts;
use super::trainer::check_enough_examples;
use crate::adapter::Adapter;
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};
use crate::generate::session::{ModelSource, ModelSpec, Session};
use crate::image::Processing;
use crate::model::geometry::Geometry;
use crate::model::LlavaNext;

/// A training run: its inputs and outputs, and the settings that replace those of the YAML config. The fields
/// are the flags of `train-dpo` and `train-sft`, whose messages name them.
#[derive(Debug, Clone)]
pub struct TrainRun {
    /// The base model folder, or (when None) `random_weights`.
    pub model: Option<PathBuf>,
    /// A geometry with random weights drawn from the config's seed instead of a model folder.
    pub random_weights: Option<Geometry>,
    pub processing: Option<Processing>,
    /// Preference pairs JSONL for DPO, LLaVA-format conversations for SFT.
    pub data: PathBuf,
    pub image_dir: PathBuf,
    /// The folder of the adapter, its checkpoints, logs and summary.
    pub output: PathBuf,
    /// The YAML config; None: the shipped one of the command.
    pub config: Option<PathBuf>,
    pub overrides: Overrides,
    /// Start from this adapter instead of a fresh one.
    pub init_adapter: Option<PathBuf>,
    /// Continue from the latest checkpoint in `output`.
    pub resume: bool,
    /// Skip malformed records (reported) instead of stopping at the first.
    pub skip_bad: bool,
    /// TensorBoard's folder (default: OUTPUT/runs).
    pub logging_dir: Option<PathBuf>,
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of `data` (chosen by the seed) for evaluation.
    pub val_fraction: Option<f64>,
    pub sample_prompts: Option<PathBuf>,
    /// Steps between samples (default: the eval steps).
    pub sample_every: Option<usize>,
    pub sample_max_new_tokens: usize,
    /// Stop after this many optimizer steps, as if interrupted.
    pub stop_after_steps: Option<usize>,
    /// Write the first micro-batch's loss, batch and gradients to this safetensors file instead of training.
    pub dump_first_step: Option<PathBuf>,
}

/// A `train-dpo` run.
#[derive(Debug, Clone)]
pub struct DpoRun {
    pub run: TrainRun,
    /// Compute the reference log-probs of every pair once before training.
    pub precompute_reference: bool,
    /// Run a pair's prompt once for both responses (false: each row on its own, slower, the same numbers).
    pub share_prefix: bool,
}

/// Records of one data file: each with its position in the file.
pub(super) struct DataSource<R> {
    pub path: PathBuf,
    pub records: Vec<(usize, R)>,
    pub skipped: Vec<String>,
}

pub(super) struct DataSets<R> {
    pub train: DataSource<R>,
    pub eval: Option<DataSource<R>>,
    /// The records of --data held out by --val-fraction.
    pub held_out: Vec<usize>,
}

pub(super) struct Examples<E> {
    pub train: Vec<E>,
    pub eval: Vec<E>,
    /// Counts of used, skipped and truncated records, for the summary.
    pub report: serde_json::Value,
}

/// Mixed into the seed of the --val-fraction split, so that it does not follow the epochs' example order.
const VAL_SPLIT_SALT: u64 = 0x005e_ed0f_0a1d;

impl TrainRun {
    /// The config (`shipped` when no --config is given) with the overrides applied, validated.
    pub(super) fn config(&self, shipped: &str) -> Result<TrainConfig> {
        let mut cfg = match &self.config {
            Some(path) => TrainConfig::from_yaml(path)?,
            None => TrainConfig::shipped(shipped),
        };
        self.overrides.apply(&mut cfg);
        if let Some(f) = self.val_fraction.filter(|f| !(*f > 0.0 && *f < 1.0)) {
            return Err(Error::Input(format!(
                "--val-fraction {f}: give a fraction above 0 and below 1 (0.05 holds out 5% of --data)"
            )));
        }
        if self.sample_every == Some(0) {
            return Err(Error::Input("--sample-every 0: give the number of steps between samples (at least 1)".into()));
        }
        if cfg.disable_dropout {
            cfg.lora.dropout = 0.0;
        }
        cfg.validate()?;
        let mut inputs = vec![("--data", self.data.as_path())];
        inputs.extend(self.init_adapter.as_deref().map(|adapter| ("--init-adapter", adapter)));
        inputs.extend(self.eval_data.as_deref().map(|data| ("--eval-data", data)));
        inputs.extend(self.sample_prompts.as_deref().map(|prompts| ("--sample-prompts", prompts)));
        self.model_spec(&cfg).check_output("--output", &self.output, &inputs)?;
        Ok(cfg)
    }

    pub(super) fn model_spec(&self, cfg: &TrainConfig) -> ModelSpec {
        ModelSpec {
            model: ModelSource::from_flags(self.model.clone(), self.random_weights, cfg.seed),
            adapter: None,
            processing: self.processing,
            dtype: cfg.dtype.clone(),
            device: cfg.device.clone(),
        }
    }

    /// Loads the model; under torchrun each rank takes its own GPU (cuda:LOCAL_RANK) when training on CUDA.
    pub(super) fn load(&self, cfg: &TrainConfig, group: Option<&ProcessGroup>) -> Result<Session> {
        let spec = self.model_spec(cfg);
        let device = spec.device()?;
        let mut session = spec.load_on(group.map_or(device, |g| g.device_for(device)))?;
        if cfg.image_layout == ImageLayout::PadFlat {
            session.model.cfg.image.aspect_mode = crate::image::AspectMode::Pad;
            session.model.cfg.image.patch_merge = crate::image::PatchMerge::Flat;
        }
        Ok(session)
    }

    /// The `--sample-prompts`, checked before any training (rank 0 writes the samples).
    pub(super) fn sample_prompts(
        &self,
        session: &Session,
        group: Option<&ProcessGroup>,
    ) -> Result<Option<SamplePrompts>> {
        match &self.sample_prompts {
            Some(file) if group.is_none_or(|g| g.is_main()) => {
                SamplePrompts::load(file, &self.image_dir, session.model.cfg.image.max_pixels).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The training and the held-out records: `--eval-data` read with `read`, or `--val-fraction` of `--data`
    /// (read with `read` too).
    pub(super) fn split<R>(
        &self,
        cfg: &TrainConfig,
        read: impl Fn(&Path) -> Result<Records<R>>,
    ) -> Result<DataSets<R>> {
        let (records, skipped) = read(&self.data)?;
        let train = DataSource { path: self.data.clone(), records, skipped };
        if let Some(path) = &self.eval_data {
            let (records, skipped) = read(path)?;
            return Ok(DataSets {
                train,
                eval: Some(DataSource { path: path.clone(), records, skipped }),
                held_out: Vec::new(),
            });
        }
        let Some(fraction) = self.val_fraction else { return Ok(DataSets { train, eval: None, held_out: Vec::new() }) };
        let n = train.records.len();
        if n < 2 {
            return Err(Error::Input(format!(
                "--val-fraction: {} has {n} usable record(s); holding some out needs at least 2",
                self.data.display()
            )));
        }
        let held = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ VAL_SPLIT_SALT));
        let mut is_held = vec![false; n];
        order[..held].iter().for_each(|&i| is_held[i] = true);
        let (mut kept, mut eval) = (Vec::new(), Vec::new());
        for (record, held) in train.records.into_iter().zip(is_held) {
            if held {
                eval.push(record)
            } else {
                kept.push(record)
            }
        }
        let held_out = eval.iter().map(|(position, _)| *position).collect();
        let eval = DataSource { path: self.data.clone(), records: eval, skipped: Vec::new() };
        Ok(DataSets { train: DataSource { records: kept, ..train }, eval: Some(eval), held_out })
    }

    /// The adapter to train: `--init-adapter`, or a fresh one seeded by the config.
    pub(super) fn attach_adapter(&self, model: &mut LlavaNext, cfg: &TrainConfig) -> Result<Adapter> {
        tch::manual_seed(cfg.seed as i64);
        match &self.init_adapter {
            Some(dir) => Adapter::load(model, dir, true),
            None => Adapter::inject(model, &cfg.lora),
        }
    }

    /// Builds the examples of every record (training and held out), skipping (with `--skip-bad`) or stopping at
    /// the first bad one. `build` gives the example, how many of its responses were truncated and its image
    /// feature count.
    pub(super) fn examples<R, E>(
        &self,
        what: &str,
        cfg: &TrainConfig,
        group: Option<&ProcessGroup>,
        sets: DataSets<R>,
        mut build: impl FnMut(&R) -> std::result::Result<(E, usize, usize), String>,
    ) -> Result<Examples<E>> {
        let quiet = group.is_some_and(|g| !g.is_main());
        let (train, mut report) = self.build(what, cfg.max_length, quiet, sets.train, &mut build)?;
        let eval = match sets.eval {
            Some(source) => {
                let (path, held_out) = (source.path.display().to_string(), !sets.held_out.is_empty());
                let (eval, eval_report) =
                    self.build(&format!("held-out {what}"), cfg.max_length, quiet, source, &mut build)?;
                let source = if held_out {
                    format!("--val-fraction {} of {path}", self.val_fraction.unwrap_or_default())
                } else {
                    path
                };
                report["eval"] = serde_json::json!({"source": source, "records": sets.held_out, "report": eval_report});
                eval
            }
            None => Vec::new(),
        };
        report["used"] = train.len().into();
        // --dump-first-step runs one full micro-batch; training needs one example per rank
        let needed = if self.dump_first_step.is_some() { cfg.batch_size } else { crate::dist::rank_and_world(group).1 };
        check_enough_examples(train.len(), needed, what)?;
        Ok(Examples { train, eval, report })
    }

    /// The examples of one data file, and what was skipped or cut (for the summary).
    fn build<R, E>(
        &self,
        what: &str,
        max_length: usize,
        quiet: bool,
        source: DataSource<R>,
        build: &mut impl FnMut(&R) -> std::result::Result<(E, usize, usize), String>,
    ) -> Result<(Vec<E>, serde_json::Value)> {
        let path = source.path.display();
        let mut examples = Vec::new();
        let mut problems = source.skipped;
        let mut truncated = 0;
        let (mut fewest_features, mut most_features) = (usize::MAX, 0);
        for (position, record) in &source.records {
            match build(record) {
                Ok((example, cut, features)) => {
                    examples.push(example);
                    truncated += cut;
                    fewest_features = fewest_features.min(features);
                    most_features = most_features.max(features);
                }
                Err(why) if self.skip_bad => problems.push(format!("{path} record {position}: {why}")),
                Err(why) => {
                    return Err(Error::Input(format!(
                        "{path} record {position}: {why} (pass --skip-bad to skip such records)"
                    )))
                }
            }
        }
        if examples.is_empty() {
            return Err(Error::Input(format!(
                "{path}: no usable {what} ({} skipped: {})",
                problems.len(),
                problems.join("; ")
            )));
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

    /// The path of a record's image under `--image-dir` and the number of features it becomes.
    pub(super) fn image_features(
        &self,
        model: &LlavaNext,
        name: &str,
    ) -> std::result::Result<(PathBuf, usize), String> {
        let path = image_path(&self.image_dir, name).map_err(|e| e.to_string())?;
        let size = image_size(&path).map_err(|e| e.to_string())?;
        let (pixels, limit) = (u64::from(size.0) * u64::from(size.1), model.cfg.image.max_pixels);
        if pixels > limit {
            let what = path.display().to_string();
            return Err(crate::image::ImageError::TooManyPixels { what, width: size.1, height: size.0, pixels, limit }
                .to_string());
        }
        Ok((path, crate::image::anyres::num_image_features(size, &model.cfg.image, model.cfg.vision.patch_size as u32)))
    }
}

/// A user message as the model sees it: `<image>` placed as configured, or refused in a text-only run.
pub(super) fn user_message(text: &str, with_image: bool, cfg: &TrainConfig) -> std::result::Result<String, String> {
    if cfg.text_only && text.contains(crate::text::tokenizer::IMAGE_TOKEN) {
        return Err("the message holds <image> but the config says text_only".into());
    }
    let text = if cfg.image_token_first { crate::text::templates::image_token_first(text) } else { text.to_string() };
    Ok(if with_image { Session::user_text(&text, true) } else { text })
}
