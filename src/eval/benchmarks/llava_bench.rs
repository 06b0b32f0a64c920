//! LLaVA-Bench (in the wild): `questions.jsonl`, `context.jsonl` and `answers_gpt4.jsonl` of
//! liuhaotian/llava-bench-in-the-wild, reviewed by an LLM judge as `eval_gpt_review_bench.py` does and
//! summarised as `summarize_gpt_review.py` does.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{required_judge, Answer, Benchmark, GraderFile, Judge, LoadOptions, Protocol, Score, ScoreError};
use crate::eval::files::{invalid, json_text, read_jsonl, require, to_meta, EvalDataError};
use crate::eval::item::{EvalItem, ImageSource};
use crate::eval::judge::{llava_bench_rule, JudgeClient, JudgeError, LlavaBenchReviewInput, LLAVA_BENCH_JUDGE_MODEL};
use crate::eval::python::python_round;

const NAME: &str = "llava-bench";

pub struct LlavaBench;

impl Benchmark for LlavaBench {
    fn name(&self) -> &'static str {
        NAME
    }

    fn protocol(&self) -> Protocol {
        Protocol { answer_tokens: 1024, judge: Judge::Required(LLAVA_BENCH_JUDGE_MODEL) }
    }

    fn load(&self, data_dir: &Path, _options: &LoadOptions) -> Result<Vec<EvalItem>, EvalDataError> {
        load_llava_bench(data_dir)
    }

    /// Reviews that the judge answers without two scores enter as `[-1, -1]`,
    /// as in `eval_gpt_review_bench.py`; transport and HTTP failures abort.
    /// With several judge runs every answer is reviewed once per run; the numbers are the means over the runs
    /// and `judge_runs` holds the spread of the relative scores.
    fn score(&self, answers: &[Answer], judge: Option<&JudgeClient>) -> Result<Score, ScoreError> {
        let judge = required_judge(NAME, judge)?;
        let inputs = review_inputs(answers)?;
        let runs = judge.config().runs;
        let mut summaries = Vec::with_capacity(runs as usize);
        let mut model_total = 0.0;
        for run in 1..=runs {
            let reviews = review(judge, &inputs, run)?;
            model_total += reviews.iter().map(|(_, scores)| scores[1]).sum::<f64>();
            summaries.push(llava_bench_summary(&reviews));
        }
        let summary = mean_summary(&summaries);
        let mut score = Score::new(NAME, model_total / f64::from(runs), answers.len());
        score.accuracy = summary.get("all").map_or(0.0, |all| all.relative / 100.0);
        score = score.with_extra("categories", to_meta(summary));
        if runs > 1 {
            let spread = json!({ "runs": runs, "relative": relative_spread(&summaries) });
            score = score.with_extra("judge_runs", spread);
        }
        Ok(score)
    }

    fn repeats_judge_review(&self) -> bool {
        true
    }

    /// LLaVA's answer-file lines, which `eval_gpt_review_bench.py` reads beside `answers_gpt4.jsonl`.
    fn grader_file(&self, answers: &[Answer]) -> Option<GraderFile> {
        let lines: Vec<String> = answers
            .iter()
            .map(|Answer { item, prediction }| {
                let question_id = item.id.parse::<i64>().map(Value::from).unwrap_or_else(|_| item.id.clone().into());
                serde_json::json!({"question_id": question_id, "prompt": item.question, "text": prediction,
                    "answer_id": item.id, "model_id": "stic", "metadata": {}})
                .to_string()
            })
            .collect();
        Some(GraderFile { name: "llava_bench_answers.jsonl", contents: lines.join("\n") + "\n" })
    }
}

/// The category of each answer and the review the judge is asked for.
fn review_inputs(answers: &[Answer]) -> Result<Vec<(String, LlavaBenchReviewInput)>, ScoreError> {
    answers
        .iter()
        .map(|entry| {
            let meta: LlavaBenchMeta = entry.meta(NAME)?;
            let rule = llava_bench_rule(&meta.category).ok_or_else(|| ScoreError::InvalidMeta {
                benchmark: NAME,
                id: entry.item.id.clone(),
                source: serde::de::Error::custom(format!("no review rule for category {:?}", meta.category)),
            })?;
            let input = LlavaBenchReviewInput {
                rule,
                context: meta.context,
                question: entry.item.question.clone(),
                reference_answer: meta.reference_answer,
                model_answer: entry.prediction.to_string(),
            };
            Ok((meta.category, input))
        })
        .collect()
}

/// One judge run over every answer: `(category, [reference score, model score])`.
fn review(
    judge: &JudgeClient,
    inputs: &[(String, LlavaBenchReviewInput)],
    run: u32,
) -> Result<Vec<(String, [f64; 2])>, ScoreError> {
    inputs
        .iter()
        .map(|(category, input)| {
            let scores = match judge.review_llava_bench(input, run) {
                Ok(scores) => scores,
                // A reply the judge client could not read counts like an unreadable score; its stats count it.
                Err(JudgeError::UnparsableScore { .. } | JudgeError::MalformedReply { .. }) => [-1.0, -1.0],
                Err(error) => return Err(error.into()),
            };
            Ok((category.clone(), scores))
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaBenchMeta {
    /// "conv", "detail" or "complex".
    pub category: String,
    /// The image's caption(s) from `context.jsonl`, joined by newlines.
    pub context: String,
    /// GPT-4's answer from `answers_gpt4.jsonl`.
    pub reference_answer: String,
}

#[derive(Deserialize)]
struct LlavaBenchQuestion {
    question_id: Value,
    image: String,
    text: String,
    category: String,
}

#[derive(Deserialize)]
struct LlavaBenchContext {
    image: String,
    caption: Value,
}

#[derive(Deserialize)]
struct LlavaBenchAnswer {
    question_id: Value,
    text: String,
}

fn load_llava_bench(data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    const ORIGIN: &str = "it is part of the llava-bench-in-the-wild dataset that LLaVA's evaluation guide \
        downloads into playground/data/eval/llava-bench-in-the-wild";
    let questions_path = require(NAME, data_dir.join("questions.jsonl"), ORIGIN)?;
    let context_path = require(NAME, data_dir.join("context.jsonl"), ORIGIN)?;
    let answers_path = require(NAME, data_dir.join("answers_gpt4.jsonl"), ORIGIN)?;
    let images_dir = require(NAME, data_dir.join("images"), ORIGIN)?;
    let captions: HashMap<String, String> = read_jsonl::<LlavaBenchContext>(&context_path)?
        .into_iter()
        .map(|context| {
            let caption = match &context.caption {
                Value::Array(lines) => lines.iter().map(json_text).collect::<Vec<_>>().join("\n"),
                other => json_text(other),
            };
            (context.image, caption)
        })
        .collect();
    let reference_answers: HashMap<String, String> = read_jsonl::<LlavaBenchAnswer>(&answers_path)?
        .into_iter()
        .map(|answer| (json_text(&answer.question_id), answer.text))
        .collect();
    read_jsonl::<LlavaBenchQuestion>(&questions_path)?
        .into_iter()
        .map(|question| {
            let id = json_text(&question.question_id);
            if llava_bench_rule(&question.category).is_none() {
                return Err(invalid(
                    &questions_path,
                    format!(
                        "question {id}: category {:?} has no review rule (llava_bench_<category> in LLaVA's rule.json)",
                        question.category
                    ),
                ));
            }
            let context = captions
                .get(&question.image)
                .ok_or_else(|| invalid(&context_path, format!("no caption for image {}", question.image)))?;
            let reference_answer = reference_answers
                .get(&id)
                .ok_or_else(|| invalid(&answers_path, format!("no GPT-4 answer for question {id}")))?;
            Ok(EvalItem {
                id,
                image: ImageSource::Path(images_dir.join(&question.image)),
                question: question.text,
                meta: to_meta(LlavaBenchMeta {
                    category: question.category,
                    context: context.clone(),
                    reference_answer: reference_answer.clone(),
                }),
            })
        })
        .collect()
}

/// One row of `summarize_gpt_review.py`'s output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LlavaBenchSummary {
    /// Model score relative to the reference (GPT-4) answer, in percent.
    pub relative: f64,
    /// Mean reference score, times 10.
    pub reference: f64,
    /// Mean model score, times 10.
    pub model: f64,
}

/// Per-category and `"all"` summary of LLaVA-Bench reviews, each given as
/// `(category, [reference score, model score])`. Failed reviews enter as
/// `[-1, -1]`, as in the official script, and the means are rounded to three
/// decimals before the ratio is taken, as there.
pub fn llava_bench_summary(reviews: &[(String, [f64; 2])]) -> BTreeMap<String, LlavaBenchSummary> {
    let mut by_category: BTreeMap<String, Vec<[f64; 2]>> = BTreeMap::new();
    for (category, scores) in reviews {
        by_category.entry(category.clone()).or_default().push(*scores);
        by_category.entry("all".to_string()).or_default().push(*scores);
    }
    by_category
        .into_iter()
        .map(|(category, pairs)| {
            let mean = |k: usize| python_round(pairs.iter().map(|p| p[k]).sum::<f64>() / pairs.len() as f64, 3);
            let (reference, model) = (mean(0), mean(1));
            let summary = LlavaBenchSummary {
                relative: python_round(model / reference * 100.0, 1),
                reference: python_round(reference * 10.0, 1),
                model: python_round(model * 10.0, 1),
            };
            (category, summary)
        })
        .collect()
}

/// Each number of the per-run summaries averaged over the runs (one run: its own numbers).
pub fn mean_summary(runs: &[BTreeMap<String, LlavaBenchSummary>]) -> BTreeMap<String, LlavaBenchSummary> {
    let mean = |category: &str, field: fn(&LlavaBenchSummary) -> f64| {
        runs.iter().map(|run| field(&run[category])).sum::<f64>() / runs.len() as f64
    };
    runs.first()
        .into_iter()
        .flat_map(BTreeMap::keys)
        .map(|category| {
            let summary = LlavaBenchSummary {
                relative: mean(category, |s| s.relative),
                reference: mean(category, |s| s.reference),
                model: mean(category, |s| s.model),
            };
            (category.clone(), summary)
        })
        .collect()
}

/// How a number varies over the judge runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSpread {
    pub mean: f64,
    /// Sample standard deviation (over runs - 1).
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub per_run: Vec<f64>,
}

impl RunSpread {
    /// Of at least two values.
    fn of(per_run: Vec<f64>) -> Self {
        let count = per_run.len() as f64;
        let mean = per_run.iter().sum::<f64>() / count;
        let variance = per_run.iter().map(|value| (value - mean).powi(2)).sum::<f64>() / (count - 1.0);
        RunSpread {
            mean,
            std: variance.sqrt(),
            min: per_run.iter().copied().fold(f64::INFINITY, f64::min),
            max: per_run.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            per_run,
        }
    }
}

/// The spread of each category's relative score over two or more judge runs.
pub fn relative_spread(runs: &[BTreeMap<String, LlavaBenchSummary>]) -> BTreeMap<String, RunSpread> {
    runs.first()
        .into_iter()
        .flat_map(BTreeMap::keys)
        .map(|category| (category.clone(), RunSpread::of(runs.iter().map(|run| run[category].relative).collect())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::score;
    use super::super::test_support::{jsonl, load, missing_file_message, predictions, write};
    use super::*;
    use crate::eval::judge::test_support::{completion, test_client, StubServer};
    use crate::eval::judge::JudgeConfig;

    fn llava_bench_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "questions.jsonl",
            &jsonl(&[
                json!({ "question_id": 0, "image": "001.jpg", "text": "What is the name of this famous sight?", "category": "conv" }),
                json!({ "question_id": 1, "image": "001.jpg", "text": "Describe this photo in detail.", "category": "detail" }),
            ]),
        );
        write(
            dir.path(),
            "context.jsonl",
            &jsonl(&[json!({ "id": "001", "image": "001.jpg", "caption": ["Diamond Head.", "Waikiki beach."] })]),
        );
        write(
            dir.path(),
            "answers_gpt4.jsonl",
            &jsonl(&[
                json!({ "question_id": 0, "text": "Diamond Head." }),
                json!({ "question_id": 1, "text": "A crater above a beach." }),
            ]),
        );
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        dir
    }

    #[test]
    fn llava_bench_joins_questions_captions_and_reference_answers() {
        let dir = llava_bench_dir();
        let items = load(&LlavaBench, dir.path()).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].question, "What is the name of this famous sight?");
        assert_eq!(items[0].image, ImageSource::Path(dir.path().join("images/001.jpg")));
        assert_eq!(
            items[1].meta_as::<LlavaBenchMeta>().unwrap(),
            LlavaBenchMeta {
                category: "detail".to_string(),
                context: "Diamond Head.\nWaikiki beach.".to_string(),
                reference_answer: "A crater above a beach.".to_string(),
            }
        );
        std::fs::remove_file(dir.path().join("answers_gpt4.jsonl")).unwrap();
        let message = missing_file_message(&LlavaBench, dir.path());
        assert!(message.contains("answers_gpt4.jsonl") && message.contains("llava-bench-in-the-wild"), "{message}");
    }

    #[test]
    fn llava_bench_rejects_categories_without_a_review_rule() {
        let dir = llava_bench_dir();
        write(
            dir.path(),
            "questions.jsonl",
            &jsonl(&[json!({ "question_id": 0, "image": "001.jpg", "text": "Q", "category": "ocr" })]),
        );
        let error = load(&LlavaBench, dir.path()).unwrap_err();
        assert!(error.to_string().contains("category \"ocr\" has no review rule"), "{error}");
    }

    #[test]
    fn llava_bench_scoring_uses_judge_reviews() {
        let dir = llava_bench_dir();
        let items = load(&LlavaBench, dir.path()).unwrap();
        let server = StubServer::start(vec![(200, completion("8 6\nfine")), (200, completion("no scores here"))]);
        let judge = test_client(&server.url, None);
        let preds = predictions(&[("0", "Diamond Head"), ("1", "A beach.")]);
        let score = score(&LlavaBench, &items, &preds, Some(&judge)).unwrap();
        let bodies = server.finish();
        assert!(bodies[0].contains("[Assistant 2]\\nDiamond Head\\n"));
        // Second review unparsable -> [-1, -1]; all: means 3.5 and 2.5 -> 71.4%.
        assert!((score.accuracy - 0.714).abs() < 1e-9, "{}", score.accuracy);
        assert_eq!(score.extra["categories"]["conv"]["relative"], 75.0);
        assert_eq!(judge.stats().unparsable_scores, 1);
        let error = super::super::score(&LlavaBench, &items, &preds, None).unwrap_err();
        assert!(matches!(error, ScoreError::JudgeRequired(NAME)));
    }

    #[test]
    fn llava_bench_summary_matches_summarize_gpt_review() {
        let reviews = vec![
            ("conv".to_string(), [8.0, 6.0]),
            ("conv".to_string(), [10.0, 8.0]),
            ("detail".to_string(), [-1.0, -1.0]), // a failed review still counts
        ];
        let summary = llava_bench_summary(&reviews);
        // conv: means 9 and 7 -> 7/9 = 77.8%, scaled means 90.0 and 70.0.
        assert_eq!(summary["conv"], LlavaBenchSummary { relative: 77.8, reference: 90.0, model: 70.0 });
        // all: means (17/3 = 5.667) and (13/3 = 4.333) -> 4.333/5.667 = 76.46% -> 76.5.
        assert_eq!(summary["all"], LlavaBenchSummary { relative: 76.5, reference: 56.7, model: 43.3 });
        assert_eq!(summary["detail"].relative, 100.0);
    }

    #[test]
    fn judge_runs_are_averaged_with_their_spread() {
        let run = |relative: f64, reference: f64| {
            BTreeMap::from([("all".to_string(), LlavaBenchSummary { relative, reference, model: 50.0 })])
        };
        let runs = [run(70.0, 80.0), run(80.0, 70.0), run(90.0, 60.0)];
        assert_eq!(mean_summary(&runs)["all"], LlavaBenchSummary { relative: 80.0, reference: 70.0, model: 50.0 });
        // Deviations -10, 0 and 10: sample variance 200 / 2 = 100.
        let spread = &relative_spread(&runs)["all"];
        assert_eq!(*spread, RunSpread { mean: 80.0, std: 10.0, min: 70.0, max: 90.0, per_run: vec![70.0, 80.0, 90.0] });
        // Two runs 77.8 and 76.4: mean 77.1, std |77.8 - 76.4| / sqrt(2).
        let spread = &relative_spread(&[run(77.8, 0.0), run(76.4, 0.0)])["all"];
        assert!((spread.mean - 77.1).abs() < 1e-9 && (spread.std - 1.4 / 2f64.sqrt()).abs() < 1e-9, "{spread:?}");
        // One run is its own mean, to the bit.
        assert_eq!(mean_summary(&runs[..1]), runs[0]);
    }

    #[test]
    fn every_judge_run_reviews_every_answer_in_its_own_requests() {
        let dir = llava_bench_dir();
        let items = load(&LlavaBench, dir.path()).unwrap();
        let replies = ["8 6", "10 4", "8 8", "10 8"].map(|review| (200, completion(review)));
        let server = StubServer::start(replies.to_vec());
        let judge =
            JudgeClient::new(JudgeConfig { runs: 2, ..test_client(&server.url, None).config().clone() }).unwrap();
        let preds = predictions(&[("0", "Diamond Head"), ("1", "A beach.")]);
        let score = score(&LlavaBench, &items, &preds, Some(&judge)).unwrap();
        let bodies = server.finish();
        assert_eq!(bodies.len(), 4);
        assert_eq!(bodies[0], bodies[2], "run 2 asks the same request again");
        // Run 1: all means 9 and 5 -> 55.6%; run 2: 9 and 8 -> 88.9%.
        assert_eq!(score.extra["judge_runs"]["relative"]["all"]["per_run"], json!([55.6, 88.9]));
        assert!((score.accuracy - 0.7225).abs() < 1e-9, "{}", score.accuracy);
        assert_eq!(score.extra["judge_runs"]["runs"], 2);
    }
}
