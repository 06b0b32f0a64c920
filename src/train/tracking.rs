//! What a training run records as it goes, in the forms the usual tools read: `train_log.csv` and
//! `eval_log.csv`, TensorBoard event files (tags as transformers' TensorBoard callback writes them: `train/loss`,
//! `eval/loss`), and the Hugging Face Trainer's `trainer_state.json` with its `log_history`.
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::tensorboard::EventWriter;
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;

/// Where the scalars go besides the CSV logs and trainer_state.json.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// TensorBoard event files in the logging folder.
    #[default]
    Tensorboard,
    None,
}

/// `trainer_state.json` as the Hugging Face Trainer writes it (the fields stic fills), plus the settings a
/// resumed run must share (`config`). Reads the state of older stic checkpoints (`step`, `total_steps`) too.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    #[serde(default)]
    pub best_global_step: Option<usize>,
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_model_checkpoint: Option<String>,
    #[serde(default)]
    pub epoch: f64,
    #[serde(default)]
    pub eval_steps: usize,
    #[serde(alias = "step")]
    pub global_step: usize,
    #[serde(default)]
    pub log_history: Vec<Map<String, Value>>,
    #[serde(default)]
    pub logging_steps: usize,
    #[serde(alias = "total_steps")]
    pub max_steps: usize,
    #[serde(default)]
    pub num_train_epochs: f64,
    #[serde(default)]
    pub save_steps: usize,
    #[serde(default)]
    pub train_batch_size: usize,
    pub config: Value,
}

/// One appended-to CSV log, created at its first row (a run that fails before it leaves no header-only log).
struct CsvLog {
    path: PathBuf,
    header: Vec<String>,
    /// Rows of steps up to this one are kept from a resumed run.
    keep_steps: usize,
    file: Option<std::fs::File>,
}

impl CsvLog {
    fn append(&mut self, row: &[String]) -> Result<()> {
        if self.file.is_none() {
            self.file = Some(open_log(&self.path, &self.header, self.keep_steps)?);
        }
        let file = self.file.as_mut().expect("opened");
        writeln!(file, "{}", row.join(",")).and_then(|_| file.flush()).map_err(|e| Error::io(&self.path, e))
    }
}

/// Opens a CSV log for appending, keeping only the rows of steps up to `keep_steps` (those of a resumed run).
fn open_log(path: &Path, header: &[String], keep_steps: usize) -> Result<std::fs::File> {
    let mut text = header.join(",") + "\n";
    if keep_steps > 0 {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        for line in old.lines().skip(1) {
            if line.split(',').next().and_then(|s| s.parse::<usize>().ok()).is_some_and(|s| s <= keep_steps) {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    write_atomic(path, text.as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))
}

/// The train scalars of one logged step, as the CSV log has them.
pub struct TrainRow<'a> {
    pub step: usize,
    pub epoch: f64,
    pub metric_names: &'a [&'a str],
    pub metrics: &'a [f64],
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub tokens_per_s: f64,
}

pub struct Tracker {
    train_log: CsvLog,
    eval_log: CsvLog,
    events: Option<EventWriter>,
    /// Where the event file goes and the step it purges from, until it is created at the first scalar (a run that
    /// fails before its first step leaves none, as it leaves no train_log.csv).
    events_to: Option<(PathBuf, Option<usize>)>,
    pub logging_dir: Option<PathBuf>,
    pub history: Vec<Map<String, Value>>,
    /// The lowest eval loss and its step.
    pub best: Option<(f64, usize)>,
    pub best_checkpoint: Option<String>,
}

impl Tracker {
    /// Continues `resumed` (the state of the checkpoint a run resumes from, at its step) or starts afresh.
    pub fn open(
        output: &Path,
        metric_names: &[&str],
        eval_metric_names: &[&str],
        report_to: ReportTo,
        logging_dir: &Path,
        resumed: Option<&TrainerState>,
    ) -> Result<Self> {
        let start = resumed.map_or(0, |s| s.global_step);
        let header = |first: &[&str], rest: &[&str], last: &[&str]| {
            first.iter().chain(rest).chain(last).map(|s| s.to_string()).collect()
        };
        let events_to = match report_to {
            ReportTo::Tensorboard => Some((logging_dir.to_path_buf(), resumed.map(|_| start + 1))),
            ReportTo::None => None,
        };
        Ok(Tracker {
            train_log: CsvLog {
                path: output.join("train_log.csv"),
                header: header(&["step"], metric_names, &["grad_norm", "lr", "tokens_per_s"]),
                keep_steps: start,
                file: None,
            },
            eval_log: CsvLog {
                path: output.join("eval_log.csv"),
                header: header(&["step"], eval_metric_names, &[]),
                keep_steps: start,
                file: None,
            },
            logging_dir: events_to.as_ref().map(|(dir, _)| dir.clone()),
            events: None,
            events_to,
            history: resumed.map(|s| s.log_history.clone()).unwrap_or_default(),
            best: resumed.and_then(|s| Some((s.best_metric?, s.best_global_step?))),
            best_checkpoint: resumed.and_then(|s| s.best_model_checkpoint.clone()),
        })
    }

    pub fn log_train(&mut self, row: &TrainRow) -> Result<()> {
        let mut csv = vec![row.step.to_string()];
        csv.extend(row.metrics.iter().map(|v| format!("{v:.6}")));
        csv.extend([
            format!("{:.6}", row.grad_norm),
            format!("{:.3e}", row.learning_rate),
            format!("{:.1}", row.tokens_per_s),
        ]);
        self.train_log.append(&csv)?;
        let mut scalars: Vec<(String, f64)> =
            row.metric_names.iter().map(|n| n.to_string()).zip(row.metrics.iter().copied()).collect();
        scalars.extend([
            ("grad_norm".into(), row.grad_norm),
            ("learning_rate".into(), row.learning_rate),
            ("tokens_per_s".into(), row.tokens_per_s),
            ("epoch".into(), row.epoch),
        ]);
        self.record(row.step, row.epoch, "train/", "", scalars)
    }

    pub fn log_eval(&mut self, step: usize, epoch: f64, names: &[&str], values: &[f64]) -> Result<()> {
        let mut csv = vec![step.to_string()];
        csv.extend(values.iter().map(|v| format!("{v:.6}")));
        self.eval_log.append(&csv)?;
        if let Some(loss) = names.iter().position(|&n| n == "loss").map(|i| values[i]) {
            if self.best.is_none_or(|(best, _)| loss < best) {
                self.best = Some((loss, step));
            }
        }
        let scalars = names.iter().map(|n| n.to_string()).zip(values.iter().copied()).collect();
        self.record(step, epoch, "eval/", "eval_", scalars)
    }

    /// Writes the scalars to TensorBoard under `tag_prefix` and to the log history under `key_prefix`.
    fn record(
        &mut self,
        step: usize,
        epoch: f64,
        tag_prefix: &str,
        key_prefix: &str,
        scalars: Vec<(String, f64)>,
    ) -> Result<()> {
        if let Some((dir, purge_from)) = self.events_to.take() {
            self.events = Some(EventWriter::create(&dir, purge_from)?);
        }
        if let Some(events) = self.events.as_mut() {
            let tagged: Vec<(String, f64)> = scalars.iter().map(|(n, v)| (format!("{tag_prefix}{n}"), *v)).collect();
            events.add_scalars(step, &tagged)?;
        }
        let mut entry = Map::new();
        entry.insert("epoch".into(), epoch.into());
        for (name, value) in scalars.into_iter().filter(|(n, _)| n != "epoch") {
            entry.insert(format!("{key_prefix}{name}"), finite_or_null(value));
        }
        entry.insert("step".into(), step.into());
        self.history.push(entry);
        Ok(())
    }

    /// Notes that the checkpoint of `step` was saved at `dir`: it is the best one when the best eval is of its step.
    pub fn saved_checkpoint(&mut self, step: usize, dir: &Path) {
        if self.best.is_some_and(|(_, best_step)| best_step == step) {
            self.best_checkpoint = Some(dir.display().to_string());
        }
    }

    /// The last entry of the log history that has `key`.
    pub fn last_with(&self, key: &str) -> Option<&Map<String, Value>> {
        self.history.iter().rev().find(|e| e.contains_key(key))
    }
}

fn finite_or_null(value: f64) -> Value {
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_log_keeps_the_rows_up_to_its_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.csv");
        std::fs::write(&path, "step,loss\n1,0.5\n2,0.4\n3,0.3\n").unwrap();
        let mut log =
            CsvLog { path: path.clone(), header: vec!["step".into(), "loss".into()], keep_steps: 2, file: None };
        log.append(&["3".into(), "0.25".into()]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "step,loss\n1,0.5\n2,0.4\n3,0.25\n");
    }

    #[test]
    fn an_old_checkpoint_state_reads() {
        let state: TrainerState =
            serde_json::from_str(r#"{"step": 4, "total_steps": 9, "config": {"lr": 1}}"#).unwrap();
        assert_eq!((state.global_step, state.max_steps, state.log_history.len()), (4, 9, 0));
    }
}
