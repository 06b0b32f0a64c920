//! ChartQA (test, human and augmented splits): the `test/` folder of the ChartQA release or the
//! `HuggingFaceM4/ChartQA` parquet release, scored with ChartQA's relaxed accuracy (lmms-eval's
//! `relaxed_correctness`, from Pix2Struct).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Answer, Benchmark, LoadOptions, MissingPrediction, Score, ScoreError, ANSWER_WITH_SINGLE_WORD};
use crate::eval::files::{json_text, read_json, require, to_meta, EvalDataError};
use crate::eval::hub_parquet::{ImageColumn, ParquetRelease};
use crate::eval::item::{EvalItem, ImageSource};
use crate::eval::judge::JudgeClient;
use crate::eval::python::parse_python_float;

const NAME: &str = "chartqa";

pub struct ChartQa;

impl Benchmark for ChartQa {
    fn name(&self) -> &'static str {
        NAME
    }

    fn load(&self, data_dir: &Path, _options: &LoadOptions) -> Result<Vec<EvalItem>, EvalDataError> {
        load_chartqa(data_dir)
    }

    /// Accuracy over both splits, and per split.
    /// lmms-eval scores every question of the split: one without a prediction counts as an empty answer (wrong).
    fn missing_prediction(&self) -> MissingPrediction {
        MissingPrediction::StandIn { text: "", with_image: true }
    }

    fn score(&self, answers: &[Answer], _judge: Option<&JudgeClient>) -> Result<Score, ScoreError> {
        let mut by_split: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for entry in answers {
            let meta: ChartQaMeta = entry.meta(NAME)?;
            let split = by_split.entry(meta.split).or_default();
            split.0 += f64::from(u8::from(chartqa_relaxed_correct(entry.prediction, &meta.label)));
            split.1 += 1;
        }
        let correct = by_split.values().map(|(correct, _)| correct).sum();
        let mut score = Score::new(NAME, correct, answers.len());
        for (split, (correct, total)) in by_split {
            score = score.with_extra(&format!("{split}_accuracy"), Score::new(split.as_str(), correct, total).accuracy);
        }
        Ok(score)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChartQaMeta {
    pub label: String,
    /// "human" or "augmented".
    pub split: String,
}

#[derive(Deserialize)]
struct ChartQaRecord {
    imgname: String,
    query: String,
    label: Value,
}

/// A row of the parquet release.
#[derive(Deserialize)]
struct ChartQaRow {
    query: String,
    label: Vec<String>,
    /// A `datasets` ClassLabel: 0 human, 1 machine (the release's "augmented").
    human_or_machine: u8,
}

const CHARTQA_SPLITS: [&str; 2] = ["human", "augmented"];
const CHARTQA_SPLIT_FILES: [&str; 2] = ["test_human.json", "test_augmented.json"];

const CHARTQA_PARQUET: ParquetRelease = ParquetRelease {
    repo: "HuggingFaceM4/ChartQA",
    folders: &["data", ""],
    split: "test",
    image: ImageColumn::Required("image"),
};

/// Items are named by their split and their position in it.
fn chartqa_item(split: &str, position: usize, query: &str, label: String, image: ImageSource) -> EvalItem {
    EvalItem {
        id: format!("{split}_{position}"),
        image,
        question: format!("{query}\n{ANSWER_WITH_SINGLE_WORD}"),
        meta: to_meta(ChartQaMeta { label, split: split.to_string() }),
    }
}

fn load_chartqa(data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    if let Some(files) = CHARTQA_PARQUET.instead_of(data_dir, &CHARTQA_SPLIT_FILES)? {
        return load_chartqa_parquet(&files);
    }
    let origin = format!("it is in the test/ folder of the ChartQA release; {}", CHARTQA_PARQUET.describe());
    let split_paths = CHARTQA_SPLIT_FILES
        .iter()
        .map(|file| require(NAME, data_dir.join(file), &origin))
        .collect::<Result<Vec<_>, _>>()?;
    let images_dir = require(NAME, data_dir.join("png"), &origin)?;
    let mut items = Vec::new();
    for (split, path) in CHARTQA_SPLITS.into_iter().zip(split_paths) {
        let records: Vec<ChartQaRecord> = read_json(&path)?;
        items.extend(records.into_iter().enumerate().map(|(i, record)| {
            let image = ImageSource::Path(images_dir.join(&record.imgname));
            chartqa_item(split, i, &record.query, json_text(&record.label), image)
        }));
    }
    Ok(items)
}

fn load_chartqa_parquet(files: &[PathBuf]) -> Result<Vec<EvalItem>, EvalDataError> {
    let mut split_sizes = [0; CHARTQA_SPLITS.len()];
    CHARTQA_PARQUET.read_records(files, |_, row: ChartQaRow, image| {
        let split = usize::from(row.human_or_machine);
        if split >= CHARTQA_SPLITS.len() {
            return Err(format!("human_or_machine is {split}; expected 0 (human) or 1 (machine)"));
        }
        let [label] =
            <[String; 1]>::try_from(row.label).map_err(|labels| format!("{} labels; expected one", labels.len()))?;
        split_sizes[split] += 1;
        Ok(chartqa_item(CHARTQA_SPLITS[split], split_sizes[split] - 1, &row.query, label, image))
    })
}

/// The official `_to_float`: a trailing `%` means a percentage, divided by 100.
fn chartqa_to_float(text: &str) -> Option<f64> {
    match text.strip_suffix('%') {
        Some(_) => parse_python_float(text.trim_end_matches('%')).map(|v| v / 100.0),
        None => parse_python_float(text),
    }
}

/// ChartQA relaxed accuracy: numbers within 5% relative change of the
/// target; otherwise (non-numeric, or a target of 0) a case-insensitive exact match.
pub fn chartqa_relaxed_correct(prediction: &str, target: &str) -> bool {
    const MAX_RELATIVE_CHANGE: f64 = 0.05;
    match (chartqa_to_float(prediction), chartqa_to_float(target)) {
        (Some(predicted), Some(expected)) if expected != 0.0 => {
            (predicted - expected).abs() / expected.abs() <= MAX_RELATIVE_CHANGE
        }
        _ => prediction.to_lowercase() == target.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::score;
    use super::super::test_support::{load, missing_file_message, predictions, write};
    use super::*;
    use serde_json::json;

    fn chartqa_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "test_human.json", &json!([
            { "imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?", "label": "14" }
        ]).to_string());
        write(
            dir.path(),
            "test_augmented.json",
            &json!([
                { "imgname": "multi_col_1.png", "query": "What is the value in 2019?", "label": 23.5 },
                { "imgname": "two_col_2.png", "query": "Which country is the largest?", "label": "Japan" }
            ])
            .to_string(),
        );
        std::fs::create_dir_all(dir.path().join("png")).unwrap();
        dir
    }

    #[test]
    fn chartqa_loads_both_splits_with_the_short_answer_prompt() {
        let dir = chartqa_dir();
        let items = load(&ChartQa, dir.path()).unwrap();
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["human_0", "augmented_0", "augmented_1"]);
        assert_eq!(
            items[0].question,
            "How many food item is shown in the bar graph?\nAnswer the question using a single word or phrase."
        );
        assert_eq!(items[1].image, ImageSource::Path(dir.path().join("png/multi_col_1.png")));
        assert_eq!(
            items[1].meta_as::<ChartQaMeta>().unwrap(),
            ChartQaMeta { label: "23.5".to_string(), split: "augmented".to_string() }
        );
        let preds = predictions(&[("human_0", "13"), ("augmented_0", "24"), ("augmented_1", "japan")]);
        let score = score(&ChartQa, &items, &preds, None).unwrap();
        // 13 vs 14 is 7% off (wrong); 24 vs 23.5 is 2% off (right); japan matches case-insensitively.
        assert_eq!((score.correct, score.total), (2.0, 3));
        assert_eq!(score.extra["human_accuracy"], 0.0);
        assert_eq!(score.extra["augmented_accuracy"], 1.0);
    }

    #[test]
    fn chartqa_missing_prediction_is_wrong() {
        let dir = chartqa_dir();
        let items = load(&ChartQa, dir.path()).unwrap();
        let score =
            score(&ChartQa, &items, &predictions(&[("augmented_0", "24"), ("augmented_1", "japan")]), None).unwrap();
        assert_eq!((score.correct, score.total, score.missing_predictions), (2.0, 3, 1));
        assert_eq!(score.extra["human_accuracy"], 0.0);
    }

    #[test]
    fn chartqa_missing_split_names_its_file_and_the_parquet_release() {
        let dir = chartqa_dir();
        std::fs::remove_file(dir.path().join("test_augmented.json")).unwrap();
        let message = missing_file_message(&ChartQa, dir.path());
        assert!(
            message.contains("test_augmented.json")
                && message.contains("HuggingFaceM4/ChartQA's parquet release")
                && message.contains("data/test-*.parquet"),
            "{message}"
        );
    }

    #[test]
    fn unreadable_parquet_is_named_unless_the_llava_layout_is_there() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "data/test-00000-of-00001.parquet", "<html>not found</html>");
        let error = load(&ChartQa, dir.path()).unwrap_err();
        assert!(matches!(error, EvalDataError::Parquet { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains("data/test-00000-of-00001.parquet: not a readable parquet file"), "{message}");
        let dir = chartqa_dir();
        write(dir.path(), "data/test-00000-of-00001.parquet", "not read");
        assert_eq!(load(&ChartQa, dir.path()).unwrap().len(), 3);
    }

    #[test]
    fn chartqa_relaxed_accuracy() {
        // 5% of 100 is the edge: 105 passes, 105.1 fails.
        assert!(chartqa_relaxed_correct("105", "100"));
        assert!(chartqa_relaxed_correct("95", "100"));
        assert!(!chartqa_relaxed_correct("105.1", "100"));
        // A trailing % divides by 100 on either side: 0.5 vs 50% is exact.
        assert!(chartqa_relaxed_correct("0.5", "50%"));
        assert!(chartqa_relaxed_correct("50%", "0.52"));
        assert!(!chartqa_relaxed_correct("50", "50%"));
        // Years are numbers too: 2010 is within 5% of 2008 (0.1% off).
        assert!(chartqa_relaxed_correct("2010", "2008"));
        // Commas are not numbers for float(); the strings are compared.
        assert!(!chartqa_relaxed_correct("1,000", "1000"));
        assert!(chartqa_relaxed_correct("1,000", "1,000"));
        // A zero target falls back to string equality.
        assert!(chartqa_relaxed_correct("0", "0"));
        assert!(!chartqa_relaxed_correct("0.0", "0"));
        assert!(!chartqa_relaxed_correct("0.01", "0"));
        // Text answers: case-insensitive exact match.
        assert!(chartqa_relaxed_correct("Yes", "yes"));
        assert!(!chartqa_relaxed_correct("yes.", "yes"));
    }
}
