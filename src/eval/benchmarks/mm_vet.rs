//! MM-Vet: `mm-vet.json` and the images of the MM-Vet release, graded by an LLM judge as
//! `mm-vet_evaluator.py` grades one run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{required_judge, Answer, Benchmark, GraderFile, Judge, LoadOptions, Protocol, Score, ScoreError};
use crate::eval::files::{read_json, require, to_meta, EvalDataError};
use crate::eval::item::{EvalItem, ImageSource};
use crate::eval::judge::{JudgeClient, JudgeError, MM_VET_JUDGE_MODEL};
use crate::eval::python::numpy_round;

const NAME: &str = "mm-vet";

pub struct MmVet;

impl Benchmark for MmVet {
    fn name(&self) -> &'static str {
        NAME
    }

    fn protocol(&self) -> Protocol {
        Protocol { answer_tokens: 1024, judge: Judge::Required(MM_VET_JUDGE_MODEL) }
    }

    fn load(&self, data_dir: &Path, _options: &LoadOptions) -> Result<Vec<EvalItem>, EvalDataError> {
        load_mm_vet(data_dir)
    }

    /// Grades the judge cannot give after its re-asks count 0.0, as in MM-Vet's
    /// grader. The headline is the official table's rounded total.
    fn score(&self, answers: &[Answer], judge: Option<&JudgeClient>) -> Result<Score, ScoreError> {
        let judge = required_judge(NAME, judge)?;
        let mut grades = Vec::with_capacity(answers.len());
        for entry in answers {
            let meta: MmVetMeta = entry.meta(NAME)?;
            let grade = match judge.grade_mm_vet(&entry.item.question, &meta.answer, entry.prediction) {
                Ok(grade) => grade,
                Err(JudgeError::UnparsableScore { .. }) => 0.0,
                Err(error) => return Err(error.into()),
            };
            grades.push((meta.capabilities, grade));
        }
        let summary = mm_vet_summary(&grades);
        let total = grades.iter().map(|(_, grade)| grade).sum();
        let mut score = Score::new(NAME, total, answers.len());
        score.accuracy = summary.total / 100.0;
        Ok(score.with_extra("by_capability_percent", to_meta(summary.by_capability)))
    }

    /// `{id: answer}`, the results file `mm-vet_evaluator.py` reads.
    fn grader_file(&self, answers: &[Answer]) -> Option<GraderFile> {
        let map: serde_json::Map<String, Value> =
            answers.iter().map(|answer| (answer.item.id.clone(), answer.prediction.into())).collect();
        Some(GraderFile { name: "mm-vet_results.json", contents: serde_json::to_string_pretty(&map).expect("json") })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmVetMeta {
    /// Ground truth; `<AND>` / `<OR>` join required / alternative elements.
    pub answer: String,
    pub capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct MmVetRecord {
    imagename: String,
    capability: Vec<String>,
    question: String,
    answer: String,
}

fn load_mm_vet(data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    const ORIGIN: &str = "it is in the MM-Vet release (mm-vet.zip: mm-vet.json and images/)";
    let path = require(NAME, data_dir.join("mm-vet.json"), ORIGIN)?;
    let images_dir = require(NAME, data_dir.join("images"), ORIGIN)?;
    // The file's order, in which the official grader iterates and sums.
    let records: serde_json::Map<String, Value> = read_json(&path)?;
    records
        .into_iter()
        .map(|(id, record)| {
            let record: MmVetRecord = serde_json::from_value(record).map_err(|source| EvalDataError::Json {
                path: path.clone(),
                line: None,
                source,
            })?;
            Ok(EvalItem {
                id,
                image: ImageSource::Path(images_dir.join(&record.imagename)),
                question: record.question,
                meta: to_meta(MmVetMeta { answer: record.answer, capabilities: record.capability }),
            })
        })
        .collect()
}

/// MM-Vet's score table for one run of `mm-vet_evaluator.py`: the mean grade
/// overall and per capability, in percent, rounded to `decimal_places` = 1 as
/// the script rounds NumPy floats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmVetSummary {
    pub total: f64,
    pub by_capability: BTreeMap<String, f64>,
}

/// From `(capabilities, grade in [0, 1])` per sample, in the file's order (the
/// sums are accumulated in that order, as there). A capability listed twice
/// for one sample counts once: the script reads them as a set.
pub fn mm_vet_summary(grades: &[(Vec<String>, f64)]) -> MmVetSummary {
    const DECIMAL_PLACES: u32 = 1;
    let percent = |(sum, count): (f64, usize)| {
        if count == 0 {
            0.0
        } else {
            numpy_round(sum / count as f64 * 100.0, DECIMAL_PLACES)
        }
    };
    let mut total = (0.0, 0);
    let mut by_capability: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (capabilities, grade) in grades {
        let unique: BTreeSet<&String> = capabilities.iter().collect();
        for capability in unique {
            let (sum, count) = by_capability.entry(capability.clone()).or_default();
            *sum += grade;
            *count += 1;
        }
        total.0 += grade;
        total.1 += 1;
    }
    MmVetSummary {
        total: percent(total),
        by_capability: by_capability.into_iter().map(|(capability, sums)| (capability, percent(sums))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::score;
    use super::super::test_support::{load, missing_file_message, predictions, strings, write};
    use super::*;
    use crate::eval::judge::test_support::{completion, test_client, StubServer};
    use serde_json::json;

    #[test]
    fn mm_vet_loads_in_file_order_and_scores_with_the_judge() {
        let dir = tempfile::tempdir().unwrap();
        let records = json!({
            "v1_10": { "imagename": "v1_10.png", "capability": ["ocr"], "question": "What is written?", "answer": "STOP" },
            "v1_2": { "imagename": "v1_2.jpg", "capability": ["math", "ocr"], "question": "What is x?", "answer": "-1<AND>-5" }
        });
        write(dir.path(), "mm-vet.json", &records.to_string());
        let message = missing_file_message(&MmVet, dir.path());
        assert!(message.contains("images") && message.contains("mm-vet.zip"), "{message}");
        std::fs::create_dir_all(dir.path().join("images")).unwrap();

        let items = load(&MmVet, dir.path()).unwrap();
        // The official grader iterates (and sums) in the file's order.
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["v1_10", "v1_2"]);
        assert_eq!(items[1].question, "What is x?");
        assert_eq!(items[0].image, ImageSource::Path(dir.path().join("images/v1_10.png")));
        assert_eq!(items[1].meta_as::<MmVetMeta>().unwrap().capabilities, ["math", "ocr"]);

        let server = StubServer::start(vec![(200, completion("0.5")), (200, completion("1.0"))]);
        let judge = test_client(&server.url, None);
        let score =
            score(&MmVet, &items, &predictions(&[("v1_2", "x = -1"), ("v1_10", "STOP")]), Some(&judge)).unwrap();
        let bodies = server.finish();
        assert!(bodies[0].contains("What is written? | STOP | STOP | "));
        assert!(bodies[1].contains("What is x? | -1 <AND> -5 | x = -1 | "));
        // v1_10 (ocr) 0.5, v1_2 (math, ocr) 1.0.
        assert_eq!((score.correct, score.accuracy), (1.5, 0.75));
        assert_eq!(score.extra["by_capability_percent"]["ocr"], 75.0);
        assert_eq!(score.extra["by_capability_percent"]["math"], 100.0);
    }

    #[test]
    fn mm_vet_summary_averages_overall_and_per_capability() {
        let grades = vec![
            (strings(&["ocr", "math"]), 1.0),
            (strings(&["ocr", "ocr"]), 0.5), // a repeated capability counts once
            (strings(&["rec"]), 0.0),
        ];
        let summary = mm_vet_summary(&grades);
        assert_eq!(summary.total, 50.0);
        // ocr: (1.0 + 0.5) / 2 samples.
        assert_eq!(summary.by_capability["ocr"], 75.0);
        assert_eq!(summary.by_capability["math"], 100.0);
        assert_eq!(summary.by_capability["rec"], 0.0);
        assert_eq!(mm_vet_summary(&[]).total, 0.0);

        // Two thirds: 66.666... -> 66.7 (one decimal).
        let thirds = vec![(strings(&["rec"]), 1.0), (strings(&["rec"]), 1.0), (strings(&["rec"]), 0.0)];
        assert_eq!(mm_vet_summary(&thirds).total, 66.7);

        // 7 grades of 0.1 among 200 samples: 0.7 / 200 * 100 = 0.35 (stored below 0.35), which the
        // official NumPy rounding reports as 0.4 (Python's round would say 0.3).
        let mut sparse = vec![(strings(&["ocr"]), 0.1); 7];
        sparse.resize(200, (strings(&["ocr"]), 0.0));
        let summary = mm_vet_summary(&sparse);
        assert_eq!((summary.total, summary.by_capability["ocr"]), (0.4, 0.4));
    }
}
