//! The seven benchmarks STIC reports, one module each behind the [`Benchmark`] trait: where its files come from
//! (LLaVA-1.5's `playground/data/eval/<benchmark>/` layout or, for some, the parquet release on the Hugging Face
//! hub), the prompt its official evaluation script builds for each question, and its official scorer.
//!
//! Adding a benchmark is one new module and one line of [`BENCHMARKS`].

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use super::files::EvalDataError;
pub use super::item::{EvalItem, ImageSource};
use super::judge::{JudgeClient, JudgeError};

mod chartqa;
mod llava_bench;
mod mathvista;
mod mm_vet;
mod mmbench;
mod scienceqa;
mod textvqa;

pub use mmbench::{AccuracyBy, CATEGORY_ACCURACY, L2_CATEGORY_ACCURACY};

/// Every benchmark `stic eval` knows, in the order the paper's table lists them.
pub static BENCHMARKS: [&dyn Benchmark; 7] = [
    &scienceqa::ScienceQa,
    &textvqa::TextVqa,
    &chartqa::ChartQa,
    &llava_bench::LlavaBench,
    &mmbench::MmBench,
    &mm_vet::MmVet,
    &mathvista::MathVista,
];

impl std::fmt::Debug for dyn Benchmark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One benchmark: its items (each with the prompt the official script builds) and its official scorer.
pub trait Benchmark: Sync {
    /// The `--benchmark` name.
    fn name(&self) -> &'static str;

    /// How the official evaluation answers and grades this benchmark, beyond loading and scoring.
    fn protocol(&self) -> Protocol {
        Protocol::default()
    }

    /// The items in the order the official script answers them.
    fn load(&self, data_dir: &Path, options: &LoadOptions) -> Result<Vec<EvalItem>, EvalDataError>;

    /// Grades the answered items as the official scorer does; `judge` where the protocol has one.
    fn score(&self, answers: &[Answer], judge: Option<&JudgeClient>) -> Result<Score, ScoreError>;

    /// What the official scorer makes of a question without a prediction. The default, left out, is also what
    /// the judged benchmarks get: their official graders need an answer to every question.
    fn missing_prediction(&self) -> MissingPrediction {
        MissingPrediction::LeftOut
    }

    /// Whether its judge review can be repeated over several runs (`--judge-runs`), each scored apart and
    /// summarised by the mean and spread over the runs.
    fn repeats_judge_review(&self) -> bool {
        false
    }

    /// For a benchmark graded by an LLM judge, the file its official grader reads (written when there is no
    /// judge here), from the answers to every item in order.
    fn grader_file(&self, _answers: &[Answer]) -> Option<GraderFile> {
        None
    }

    /// For a benchmark whose LLaVA answer files name an item by something else than its id (TextVQA), what
    /// finds the item of such a line.
    fn llava_answer_index(&self, _items: &[EvalItem]) -> Option<Box<dyn LlavaAnswerIndex>> {
        None
    }
}

/// What a benchmark's official scorer makes of a question that has no prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingPrediction {
    /// Not scored: the official scorer walks the answer file, so its denominator is the answered questions.
    LeftOut,
    /// Graded as this stand-in answer: the official scorer walks the questions and fills the gap with it.
    StandIn {
        text: &'static str,
        /// Whether the stand-in still counts as a question with an image (ScienceQA's stand-in prompt has no
        /// `<image>`, which leaves it out of IMG-Accuracy).
        with_image: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    /// New tokens per answer by default.
    pub answer_tokens: usize,
    pub judge: Judge,
}

impl Default for Protocol {
    /// Short answers (a letter, a word or a number), graded by rules.
    fn default() -> Self {
        Protocol { answer_tokens: 128, judge: Judge::None }
    }
}

/// The LLM judge of a benchmark's official protocol, with the model its official script calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    None,
    /// Used when given (MathVista's answer extraction); rules stand in without it.
    Optional(&'static str),
    /// The score is the judge's (LLaVA-Bench, MM-Vet).
    Required(&'static str),
}

impl Judge {
    pub fn official_model(self) -> Option<&'static str> {
        match self {
            Judge::None => None,
            Judge::Optional(model) | Judge::Required(model) => Some(model),
        }
    }
}

/// A file for a benchmark's official grader: its name in the output folder and its contents.
pub struct GraderFile {
    pub name: &'static str,
    pub contents: String,
}

/// Finds the item a line of LLaVA's own answer file belongs to.
pub trait LlavaAnswerIndex {
    /// From the line's `question_id` and `prompt`: the item id, `None` when no item matches, `Err` when the
    /// line cannot be read as the official scorer reads it.
    fn item_id(&mut self, question_id: &str, prompt: &str) -> Result<Option<String>, String>;
}

#[derive(Debug, thiserror::Error)]
#[error("unknown benchmark {name:?}; expected one of {}", names().join(", "), name = self.0)]
pub struct UnknownBenchmark(pub String);

pub fn names() -> Vec<&'static str> {
    BENCHMARKS.iter().map(|b| b.name()).collect()
}

/// The benchmark called `name` (case-insensitive).
pub fn find(name: &str) -> Result<&'static dyn Benchmark, UnknownBenchmark> {
    BENCHMARKS
        .iter()
        .copied()
        .find(|b| b.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| UnknownBenchmark(name.to_string()))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// MMBench: expand every question into all rotations of its options
    /// (LLaVA's `--all-rounds`), for circular evaluation. Rows whose index is
    /// already >= 1e6 are the TSV's own circular copies and are then skipped.
    pub mmbench_circular: bool,
    /// ScienceQA: also the questions without an image, as the official run answers them (LLaVA reports
    /// ScienceQA-IMG, the questions with one).
    pub with_text_only: bool,
    /// MMBench: which options of a row the prompt lists.
    pub mmbench_options: MmBenchOptions,
}

/// Which options of an MMBench row its prompt lists (the scorer reads every option either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MmBenchOptions {
    /// Every option the scorer reads (VLMEvalKit's `build_choices`).
    #[default]
    All,
    /// What LLaVA's `get_options` lists: A to D, up to the first option its `is_none` rejects.
    Official,
}

impl MmBenchOptions {
    pub fn name(self) -> &'static str {
        match self {
            MmBenchOptions::All => "all",
            MmBenchOptions::Official => "official",
        }
    }

    pub fn is_default(&self) -> bool {
        *self == MmBenchOptions::default()
    }
}

/// The instruction LLaVA-1.5's multiple-choice scripts append (`--single-pred-prompt`).
const ANSWER_WITH_OPTION_LETTER: &str = "Answer with the option's letter from the given choices directly.";
/// The instruction of LLaVA-1.5's short-answer question files.
const ANSWER_WITH_SINGLE_WORD: &str = "Answer the question using a single word or phrase.";
/// Option letters in order; option `i` of a question is `OPTION_LETTERS[i]`.
const OPTION_LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// One benchmark's result, ready to be written as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub name: String,
    /// Sum of per-item scores: a count for exact-match metrics, a soft sum
    /// for VQA accuracy and MM-Vet grades.
    pub correct: f64,
    pub total: usize,
    /// Items without a prediction: graded as the official scorer grades them (see [`MissingPrediction`]), so
    /// counted in `total` where it counts them as wrong.
    #[serde(default)]
    pub missing_predictions: usize,
    /// The headline number as a fraction: `correct / total`, except where a
    /// benchmark's protocol defines it otherwise (LLaVA-Bench: the model's
    /// judge score relative to GPT-4's; MM-Vet: the official table's total,
    /// rounded to one decimal in percent; MMBench circular runs: groups).
    pub accuracy: f64,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

impl Score {
    pub fn new(name: impl Into<String>, correct: f64, total: usize) -> Self {
        let accuracy = if total == 0 { 0.0 } else { correct / total as f64 };
        Score { name: name.into(), correct, total, missing_predictions: 0, accuracy, extra: Map::new() }
    }

    pub fn with_extra(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("{0} is graded by an LLM judge; a JudgeClient is required")]
    JudgeRequired(&'static str),
    #[error("item {id}: metadata does not fit {benchmark}: {source}")]
    InvalidMeta { benchmark: &'static str, id: String, source: serde_json::Error },
    #[error("item {0} has no ground-truth answer (a test split?)")]
    MissingAnswer(String),
    #[error(transparent)]
    Judge(#[from] JudgeError),
}

/// An item with the prediction it is graded on.
pub struct Answer<'a> {
    pub item: &'a EvalItem,
    pub prediction: &'a str,
}

impl Answer<'_> {
    fn meta<T: DeserializeOwned>(&self, benchmark: &'static str) -> Result<T, ScoreError> {
        self.item.meta_as().map_err(|source| ScoreError::InvalidMeta { benchmark, id: self.item.id.clone(), source })
    }
}

/// Grades `predictions` (item id -> generated text) for `items` loaded for
/// `benchmark`. Predictions are graded as they are, as the official scorers read
/// the answer files (LLaVA's generation scripts strip their outputs when they
/// write them; so does `stic eval`). An item without a prediction is graded as the
/// official scorer grades it ([`Benchmark::missing_prediction`]) and counted in
/// [`Score::missing_predictions`]. LLaVA-Bench and MM-Vet need `judge`; MathVista,
/// given one, extracts answers with it as `extract_answer.py` does (rules stand in without).
pub fn score(
    benchmark: &dyn Benchmark,
    items: &[EvalItem],
    predictions: &HashMap<String, String>,
    judge: Option<&JudgeClient>,
) -> Result<Score, ScoreError> {
    let rule = benchmark.missing_prediction();
    let missing: Vec<&EvalItem> = items.iter().filter(|item| !predictions.contains_key(&item.id)).collect();
    let imageless_stand_ins: Vec<EvalItem> = match rule {
        MissingPrediction::StandIn { with_image: false, .. } => missing
            .iter()
            .map(|item| EvalItem {
                id: item.id.clone(),
                image: ImageSource::None,
                question: item.question.clone(),
                meta: item.meta.clone(),
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut imageless_stand_ins = imageless_stand_ins.iter();
    let mut answers = Vec::with_capacity(items.len());
    for item in items {
        match (predictions.get(&item.id), rule) {
            (Some(prediction), _) => answers.push(Answer { item, prediction }),
            (None, MissingPrediction::StandIn { text, with_image }) => {
                let item = if with_image { item } else { imageless_stand_ins.next().expect("one per missing item") };
                answers.push(Answer { item, prediction: text });
            }
            (None, MissingPrediction::LeftOut) => {}
        }
    }
    let mut score = benchmark.score(&answers, judge)?;
    score.missing_predictions = missing.len();
    Ok(score)
}

/// The judge a benchmark cannot be graded without.
fn required_judge<'j>(benchmark: &'static str, judge: Option<&'j JudgeClient>) -> Result<&'j JudgeClient, ScoreError> {
    judge.ok_or(ScoreError::JudgeRequired(benchmark))
}

/// Sums a per-item score over all items.
fn count_correct<M: DeserializeOwned>(
    benchmark: &'static str,
    answers: &[Answer],
    item_score: impl Fn(M, &str) -> Result<f64, ScoreError>,
) -> Result<Score, ScoreError> {
    let mut correct = 0.0;
    for answer in answers {
        correct += item_score(answer.meta(benchmark)?, answer.prediction)?;
    }
    Ok(Score::new(benchmark, correct, answers.len()))
}

#[cfg(test)]
mod test_support {
    use std::collections::HashMap;
    use std::path::Path;

    use serde_json::Value;

    use super::{Benchmark, EvalDataError, EvalItem, LoadOptions};

    /// A 1x1 grey PNG.
    pub const TINY_PNG_BASE64: &str =
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAsTj2FAAAAABJRU5ErkJggg==";

    pub fn write(dir: &Path, relative: &str, content: &str) {
        let path = dir.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    pub fn jsonl(lines: &[Value]) -> String {
        lines.iter().map(|line| format!("{line}\n")).collect()
    }

    pub fn predictions(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(id, text)| (id.to_string(), text.to_string())).collect()
    }

    pub fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    pub fn load(benchmark: &dyn Benchmark, dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
        benchmark.load(dir, &LoadOptions::default())
    }

    pub fn missing_file_message(benchmark: &dyn Benchmark, dir: &Path) -> String {
        let error = load(benchmark, dir).unwrap_err();
        assert!(matches!(error, EvalDataError::MissingFile { .. }), "{error}");
        error.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::predictions;
    use super::*;
    use serde_json::json;

    #[test]
    fn benchmark_names_round_trip() {
        for benchmark in BENCHMARKS {
            assert_eq!(find(benchmark.name()).unwrap().name(), benchmark.name());
        }
        assert_eq!(find("MM-Vet").unwrap().name(), "mm-vet");
        let error = find("vqav2").err().unwrap();
        assert!(error.to_string().contains("llava-bench"));
    }

    #[test]
    fn score_computes_accuracy_and_serialises_extra_fields() {
        let score = Score::new("scienceqa", 3.0, 4).with_extra("missing", 1);
        assert_eq!(score.accuracy, 0.75);
        let json = serde_json::to_value(&score).unwrap();
        assert_eq!(json["extra"]["missing"], 1);
        assert_eq!(Score::new("empty", 0.0, 0).accuracy, 0.0);
        let plain = serde_json::to_value(Score::new("x", 1.0, 1)).unwrap();
        assert!(plain.get("extra").is_none());
    }

    #[test]
    fn invalid_meta_is_reported_with_the_item() {
        let item =
            EvalItem { id: "x".to_string(), image: ImageSource::None, question: "q".to_string(), meta: json!({}) };
        let error = score(&chartqa::ChartQa, &[item], &predictions(&[("x", "1")]), None).unwrap_err();
        assert!(matches!(error, ScoreError::InvalidMeta { ref id, .. } if id == "x"), "{error}");
    }
}
