//! MathVista (testmini): MathVista's `testmini.json` (or a JSONL export) with its images, or the
//! `AI4Math/MathVista` parquet release; answers extracted as `extract_answer.py` does and scored as
//! `calculate_score.py` does.

use std::cell::Cell;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::mmbench::{infer_option_letter, lettered};
use super::{
    count_correct, Answer, Benchmark, Judge, LoadOptions, MissingPrediction, Protocol, Score, ScoreError,
    OPTION_LETTERS,
};
use crate::eval::files::{invalid, json_text, read_json, read_jsonl, require, to_meta, EvalDataError};
use crate::eval::hub_parquet::{ImageColumn, ParquetRelease};
use crate::eval::item::{EvalItem, ImageSource};
use crate::eval::judge::{JudgeClient, MATHVISTA_JUDGE_MODEL};
use crate::eval::python::{self, parse_python_float, parse_python_int, python_float_repr, python_round};

const NAME: &str = "mathvista";

pub struct MathVista;

impl Benchmark for MathVista {
    fn name(&self) -> &'static str {
        NAME
    }

    fn protocol(&self) -> Protocol {
        Protocol { answer_tokens: 1024, judge: Judge::Optional(MATHVISTA_JUDGE_MODEL) }
    }

    fn load(&self, data_dir: &Path, _options: &LoadOptions) -> Result<Vec<EvalItem>, EvalDataError> {
        load_mathvista(data_dir)
    }

    /// `calculate_score.py` scores the problems of the results file: an unanswered one is not in its denominator.
    fn missing_prediction(&self) -> MissingPrediction {
        MissingPrediction::LeftOut
    }

    /// Rule-based without a judge; with one, answers are extracted as `extract_answer.py` does.
    fn score(&self, answers: &[Answer], judge: Option<&JudgeClient>) -> Result<Score, ScoreError> {
        let extraction_failures = Cell::new(0u64);
        let extract_with_judge = |judge: &JudgeClient, query: &str, response: &str| {
            judge
                .extract_mathvista_answer(query, response)
                .inspect_err(|_| extraction_failures.set(extraction_failures.get() + 1))
                .ok()
        };
        let llm = judge.map(|judge| move |query: &str, response: &str| extract_with_judge(judge, query, response));
        let llm_extractor = llm.as_ref().map(|extract| extract as &dyn Fn(&str, &str) -> Option<String>);
        let mut score = count_correct(NAME, answers, |meta: MathVistaMeta, prediction| {
            Ok(f64::from(u8::from(mathvista_is_correct(prediction, &meta.problem, llm_extractor))))
        })?;
        if judge.is_some() {
            score = score.with_extra("llm_extraction_failures", extraction_failures.get());
        }
        Ok(score)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MathVistaMeta {
    pub pid: String,
    #[serde(flatten)]
    pub problem: MathVistaProblem,
}

#[derive(Deserialize)]
struct MathVistaRecord {
    pid: Value,
    image: String,
    /// The prompt; the GitHub repository's `data/testmini.json` has none, its queries are in `data/query.json`.
    #[serde(default)]
    query: Option<String>,
    question_type: MathVistaQuestionType,
    answer_type: MathVistaAnswerType,
    #[serde(default)]
    choices: Option<Vec<Value>>,
    #[serde(default)]
    precision: Option<f64>,
    answer: Value,
}

const MATHVISTA_JSON: [&str; 2] = ["testmini.json", "testmini.jsonl"];

const MATHVISTA_PARQUET: ParquetRelease = ParquetRelease {
    repo: "AI4Math/MathVista",
    folders: &["data", ""],
    split: "testmini",
    // `image` is the file's path inside images.zip; `decoded_image` embeds it.
    image: ImageColumn::Required("decoded_image"),
};

fn mathvista_item(record: MathVistaRecord, query: String, image: ImageSource) -> EvalItem {
    let pid = json_text(&record.pid);
    let problem = MathVistaProblem {
        query,
        question_type: record.question_type,
        answer_type: record.answer_type,
        choices: record.choices.map(|choices| choices.iter().map(json_text).collect()),
        precision: record.precision,
        answer: json_text(&record.answer),
    };
    EvalItem { id: pid.clone(), image, question: problem.query.clone(), meta: to_meta(MathVistaMeta { pid, problem }) }
}

fn load_mathvista(data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    let mut items = match MATHVISTA_PARQUET.instead_of(data_dir, &MATHVISTA_JSON)? {
        Some(files) => MATHVISTA_PARQUET.read_records(&files, |_, record: MathVistaRecord, image| {
            let query = record.query.clone().ok_or("missing field `query`")?;
            Ok(mathvista_item(record, query, image))
        })?,
        None => load_mathvista_json(data_dir)?,
    };
    items.sort_by(|a, b| natural_order(&a.id, &b.id));
    Ok(items)
}

fn load_mathvista_json(data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    let [json_path, jsonl_path] = MATHVISTA_JSON.map(|file| data_dir.join(file));
    let records: Vec<MathVistaRecord> = if json_path.exists() {
        // The release's testmini.json maps pid -> problem; a pandas export is a list.
        match read_json::<Value>(&json_path)? {
            Value::Object(by_pid) => by_pid.into_iter().map(|(_, problem)| problem).collect::<Vec<_>>(),
            Value::Array(problems) => problems,
            _ => return Err(invalid(&json_path, "expected an object keyed by pid or a list of problems")),
        }
        .into_iter()
        .map(|problem| {
            serde_json::from_value(problem).map_err(|source| EvalDataError::Json {
                path: json_path.clone(),
                line: None,
                source,
            })
        })
        .collect::<Result<_, _>>()?
    } else if jsonl_path.exists() {
        read_jsonl(&jsonl_path)?
    } else {
        return Err(EvalDataError::MissingFile {
            benchmark: NAME,
            path: json_path,
            origin: format!(
                "or {} instead, with MathVista's images.zip unpacked beside it; {}",
                jsonl_path.display(),
                MATHVISTA_PARQUET.describe()
            ),
        });
    };
    let source = if json_path.exists() { json_path } else { jsonl_path };
    let queries =
        if records.iter().any(|record| record.query.is_none()) { Some(read_queries(data_dir, &source)?) } else { None };
    let images_dir = require(NAME, data_dir.join("images"), "unpack MathVista's images.zip there")?;
    records
        .into_iter()
        .map(|record| {
            let pid = json_text(&record.pid);
            let query = record
                .query
                .clone()
                .or_else(|| queries.as_ref()?.get(&pid).cloned())
                .ok_or_else(|| invalid(&data_dir.join(QUERY_JSON), format!("no query for pid {pid}")))?;
            let image = record.image.strip_prefix("images/").unwrap_or(&record.image);
            let image = ImageSource::Path(images_dir.join(image));
            Ok(mathvista_item(record, query, image))
        })
        .collect()
}

/// The queries of the GitHub repository's `data/` folder, whose `testmini.json` has none: pid -> query.
const QUERY_JSON: &str = "query.json";

fn read_queries(data_dir: &Path, problems: &Path) -> Result<HashMap<String, String>, EvalDataError> {
    let path = require(
        NAME,
        data_dir.join(QUERY_JSON),
        &format!(
            "{} has problems without a `query` (the layout of MathVista's GitHub data/ folder), whose prompts are \
             in data/query.json: put that file beside it",
            problems.display()
        ),
    )?;
    read_json(&path)
}

/// Orders ids like "v1_2" before "v1_10": by the text before the trailing
/// digits, then by their value.
fn natural_order(a: &str, b: &str) -> Ordering {
    let split = |id: &str| {
        let prefix = id.trim_end_matches(|c: char| c.is_ascii_digit());
        let number: u64 = id[prefix.len()..].parse().unwrap_or(0);
        (prefix.to_string(), number, id.to_string())
    };
    split(a).cmp(&split(b))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MathVistaQuestionType {
    MultiChoice,
    FreeForm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MathVistaAnswerType {
    Integer,
    Float,
    Text,
    List,
}

/// The fields of a MathVista problem that answer extraction and scoring read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MathVistaProblem {
    pub query: String,
    pub question_type: MathVistaQuestionType,
    pub answer_type: MathVistaAnswerType,
    #[serde(default)]
    pub choices: Option<Vec<String>>,
    #[serde(default)]
    pub precision: Option<f64>,
    pub answer: String,
}

impl MathVistaProblem {
    fn choices(&self) -> &[String] {
        self.choices.as_deref().unwrap_or_default()
    }
}

/// The LLM fallback of MathVista answer extraction: given the problem's
/// query and the model's response, the extracted answer (or `None`).
pub type LlmAnswerExtractor<'a> = &'a dyn Fn(&str, &str) -> Option<String>;

static MATHVISTA_QUOTED_ANSWER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"The answer is "(.*)"\."#).expect("valid regex"));
static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+").expect("valid regex"));
static BRACKETED_LIST: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\[[^\[\]]*\]").expect("valid regex"));
static PARENTHESISED_LETTER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\(([a-zA-Z])\)").expect("valid regex"));

/// MathVista answer extraction, `extract_answer.py` with its defaults: an
/// empty response gives `""`; a response that is one of the choices, or
/// parses as the integer/float answer type, is taken as it is; everything
/// else goes to the LLM (`""` when it fails). Without an LLM, rules stand in
/// for it (not the official protocol): the script's `--quick_extract` rule
/// (`The answer is "..."`), then by type the MMBench option inference, the
/// last number, the last `[...]`, or the whole text.
pub fn extract_mathvista_answer(
    response: &str,
    problem: &MathVistaProblem,
    llm_extractor: Option<LlmAnswerExtractor>,
) -> String {
    if response.is_empty() {
        return String::new();
    }
    if let Some(extraction) = official_direct_extraction(response, problem) {
        return extraction;
    }
    match llm_extractor {
        Some(extract) => extract(&problem.query, response),
        None => MATHVISTA_QUOTED_ANSWER
            .captures(response)
            .map(|c| c[1].to_string())
            .or_else(|| rule_based_extraction(response, problem)),
    }
    .unwrap_or_default()
}

fn official_direct_extraction(response: &str, problem: &MathVistaProblem) -> Option<String> {
    if problem.question_type == MathVistaQuestionType::MultiChoice && problem.choices().iter().any(|c| c == response) {
        return Some(response.to_string());
    }
    match problem.answer_type {
        MathVistaAnswerType::Integer => parse_python_int(response),
        MathVistaAnswerType::Float => parse_python_float(response).map(python_float_repr),
        MathVistaAnswerType::Text | MathVistaAnswerType::List => None,
    }
}

fn rule_based_extraction(response: &str, problem: &MathVistaProblem) -> Option<String> {
    if problem.question_type == MathVistaQuestionType::MultiChoice {
        return infer_option_letter(response, &lettered(problem.choices())).map(String::from);
    }
    match problem.answer_type {
        MathVistaAnswerType::Integer | MathVistaAnswerType::Float => {
            NUMBER.find_iter(response).last().map(|m| m.as_str().replace(',', ""))
        }
        MathVistaAnswerType::List => BRACKETED_LIST.find_iter(response).last().map(|m| m.as_str().to_string()),
        MathVistaAnswerType::Text => Some(python::strip(response).to_string()).filter(|t| !t.is_empty()),
    }
}

/// `normalize_extracted_answer`: multi-choice extractions become the text of
/// the chosen option (a letter, `(X)`, or else the most similar option by
/// edit distance); integers `str(int(float(x)))`; floats
/// `str(round(float(x), precision))`; `None` when a number does not parse.
pub fn normalize_mathvista_answer(extraction: &str, problem: &MathVistaProblem) -> Option<String> {
    if problem.question_type == MathVistaQuestionType::MultiChoice {
        let choices = problem.choices();
        let extraction = python::strip(extraction);
        let letter = match PARENTHESISED_LETTER.captures(extraction) {
            Some(captures) => captures[1].to_uppercase(),
            None => extraction.to_string(),
        };
        let letter_index = OPTION_LETTERS.chars().take(choices.len()).position(|l| letter == l.to_string());
        return match letter_index {
            Some(index) => Some(choices[index].clone()),
            None => most_similar(&letter, choices).cloned(),
        };
    }
    match problem.answer_type {
        MathVistaAnswerType::Integer => {
            let value = parse_python_float(extraction)?.trunc();
            // `int(float(x))` fails on inf/nan; i128 covers every float a benchmark answer holds.
            (value.is_finite() && value.abs() < 1e38).then(|| (value as i128).to_string())
        }
        MathVistaAnswerType::Float => {
            let value = parse_python_float(extraction)?;
            let precision = problem.precision.filter(|p| p.is_finite() && *p >= 0.0)? as usize;
            Some(python_float_repr(python_round(value, precision)))
        }
        MathVistaAnswerType::Text | MathVistaAnswerType::List => Some(extraction.to_string()),
    }
}

/// The first choice with the smallest Levenshtein distance to `text`.
fn most_similar<'c>(text: &str, choices: &'c [String]) -> Option<&'c String> {
    let mut best: Option<(usize, &String)> = None;
    for choice in choices {
        let distance = strsim::levenshtein(text, choice);
        if best.is_none_or(|(best_distance, _)| distance < best_distance) {
            best = Some((distance, choice));
        }
    }
    best.map(|(_, choice)| choice)
}

/// Extraction, normalisation and `safe_equal` against the answer.
pub fn mathvista_is_correct(
    response: &str,
    problem: &MathVistaProblem,
    llm_extractor: Option<LlmAnswerExtractor>,
) -> bool {
    let extraction = extract_mathvista_answer(response, problem, llm_extractor);
    normalize_mathvista_answer(&extraction, problem).is_some_and(|normalized| normalized == problem.answer)
}

#[cfg(test)]
mod tests {
    use super::super::score;
    use super::super::test_support::{jsonl, load, missing_file_message, predictions, strings, write};
    use super::*;
    use crate::eval::judge::test_support::{completion, test_client, StubServer};
    use serde_json::json;

    #[test]
    fn natural_order_sorts_trailing_numbers_by_value() {
        let mut ids = vec!["v1_10", "v1_2", "v1_1", "10", "9"];
        ids.sort_by(|a, b| natural_order(a, b));
        assert_eq!(ids, ["9", "10", "v1_1", "v1_2", "v1_10"]);
    }

    fn mathvista_problems() -> Value {
        json!({
            "10": { "pid": "10", "image": "images/10.jpg", "question": "What fraction is blue?",
                "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\nQuestion: What fraction is blue?\nChoices:\n(A) 3/11\n(B) 8/11",
                "choices": ["3/11", "8/11"], "precision": null, "answer": "8/11",
                "question_type": "multi_choice", "answer_type": "text" },
            "2": { "pid": "2", "image": "images/2.jpg", "question": "How much money?",
                "query": "Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.\nQuestion: How much money?",
                "choices": null, "precision": 2.0, "answer": "1.45",
                "question_type": "free_form", "answer_type": "float" }
        })
    }

    #[test]
    fn mathvista_loads_json_object_in_pid_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "testmini.json", &mathvista_problems().to_string());
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let items = load(&MathVista, dir.path()).unwrap();
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["2", "10"]);
        assert_eq!(items[0].image, ImageSource::Path(dir.path().join("images/2.jpg")));
        assert!(items[1].question.ends_with("(A) 3/11\n(B) 8/11"), "the prompt is the query");
        let meta: MathVistaMeta = items[1].meta_as().unwrap();
        assert_eq!(meta.problem.choices.as_deref(), Some(&["3/11".to_string(), "8/11".to_string()][..]));
        assert_eq!(meta.problem.question_type, MathVistaQuestionType::MultiChoice);

        let preds = predictions(&[("2", "It costs $1.45."), ("10", "A")]);
        let score = score(&MathVista, &items, &preds, None).unwrap();
        assert_eq!((score.correct, score.total), (1.0, 2));
        // calculate_score.py scores the problems of its results file: a missing one is not in the denominator.
        let score = super::super::score(&MathVista, &items, &predictions(&[("2", "It costs $1.45.")]), None).unwrap();
        assert_eq!((score.correct, score.total, score.missing_predictions), (1.0, 1, 1));
    }

    #[test]
    fn mathvista_loads_jsonl_and_extracts_with_the_judge() {
        let dir = tempfile::tempdir().unwrap();
        let Value::Object(problems) = mathvista_problems() else { unreachable!() };
        write(dir.path(), "testmini.jsonl", &jsonl(&problems.into_iter().map(|(_, p)| p).collect::<Vec<_>>()));
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let items = load(&MathVista, dir.path()).unwrap();
        assert_eq!(items.len(), 2);

        // Past the direct checks every response goes to the judge, even one the rules could read.
        let server = StubServer::start(vec![(200, completion("1.45")), (200, completion("B"))]);
        let judge = test_client(&server.url, None);
        let preds = predictions(&[("2", "one dollar and forty-five cents"), ("10", "(B) 8/11")]);
        let score = score(&MathVista, &items, &preds, Some(&judge)).unwrap();
        let bodies = server.finish();
        assert_eq!(bodies.len(), 2);
        let sent: Value = serde_json::from_str(&bodies[1]).unwrap();
        assert!(sent["messages"][0]["content"].as_str().unwrap().ends_with(
            "\nQuestion: What fraction is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n\n(B) 8/11\n\nExtracted answer: "
        ));
        assert_eq!((score.correct, score.total), (2.0, 2));
        assert_eq!(score.extra["llm_extraction_failures"], 0);

        // A choice's own text and a float that parses never reach it (the stub answers nothing).
        let server = StubServer::start(Vec::new());
        let judge = test_client(&server.url, None);
        let preds = predictions(&[("2", "1.450"), ("10", "8/11")]);
        let score = super::super::score(&MathVista, &items, &preds, Some(&judge)).unwrap();
        assert!(server.finish().is_empty());
        assert_eq!((score.correct, score.total), (2.0, 2));
        assert_eq!(score.extra["llm_extraction_failures"], 0);
    }

    #[test]
    fn mathvista_github_layout_reads_the_queries_from_query_json() {
        // lupantech/MathVista's data/: testmini.json without `query` (and an integer precision), query.json beside it.
        let dir = tempfile::tempdir().unwrap();
        let Value::Object(mut problems) = mathvista_problems() else { unreachable!() };
        let mut queries = serde_json::Map::new();
        for (pid, problem) in &mut problems {
            queries.insert(pid.clone(), problem.as_object_mut().unwrap().remove("query").unwrap());
        }
        problems["2"]["precision"] = json!(2);
        write(dir.path(), "testmini.json", &Value::Object(problems).to_string());
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let message = missing_file_message(&MathVista, dir.path());
        assert!(message.contains("query.json") && message.contains("GitHub data/ folder"), "{message}");

        write(dir.path(), "query.json", &Value::Object(queries.clone()).to_string());
        let items = load(&MathVista, dir.path()).unwrap();
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["2", "10"]);
        assert_eq!(items[1].question, queries["10"].as_str().unwrap());
        let preds = predictions(&[("2", "1.45"), ("10", "B")]);
        assert_eq!(score(&MathVista, &items, &preds, None).unwrap().correct, 2.0);

        queries.remove("10");
        write(dir.path(), "query.json", &Value::Object(queries).to_string());
        let error = load(&MathVista, dir.path()).unwrap_err().to_string();
        assert!(error.contains("query.json: no query for pid 10"), "{error}");
    }

    #[test]
    fn mathvista_missing_data_mentions_both_forms_and_the_parquet_release() {
        let dir = tempfile::tempdir().unwrap();
        let message = missing_file_message(&MathVista, dir.path());
        assert!(message.contains("testmini.json") && message.contains("testmini.jsonl"), "{message}");
        assert!(
            message.contains("AI4Math/MathVista's parquet release") && message.contains("data/testmini-*.parquet"),
            "{message}"
        );
    }

    fn mathvista(
        question_type: MathVistaQuestionType,
        answer_type: MathVistaAnswerType,
        choices: Option<&[&str]>,
        precision: Option<f64>,
        answer: &str,
    ) -> MathVistaProblem {
        MathVistaProblem {
            query: "Hint: ...\nQuestion: ...".to_string(),
            question_type,
            answer_type,
            choices: choices.map(strings),
            precision,
            answer: answer.to_string(),
        }
    }

    #[test]
    fn mathvista_multi_choice_extraction_and_normalisation() {
        let problem = mathvista(
            MathVistaQuestionType::MultiChoice,
            MathVistaAnswerType::Text,
            Some(&["3/11", "8/11", "6/11", "3/5"]),
            None,
            "8/11",
        );
        assert_eq!(extract_mathvista_answer("8/11", &problem, None), "8/11");
        assert_eq!(extract_mathvista_answer("The correct answer is (B) 8/11.", &problem, None), "B");
        assert_eq!(normalize_mathvista_answer("B", &problem).as_deref(), Some("8/11"));
        assert_eq!(normalize_mathvista_answer("(b) something", &problem).as_deref(), Some("8/11"));
        // Not a letter: the closest option by edit distance ("8/12" is one edit from "8/11").
        assert_eq!(normalize_mathvista_answer("8/12", &problem).as_deref(), Some("8/11"));
        assert!(mathvista_is_correct("B", &problem, None));
        assert!(!mathvista_is_correct("A", &problem, None));
    }

    #[test]
    fn mathvista_numeric_extraction_and_normalisation() {
        let integer = mathvista(MathVistaQuestionType::FreeForm, MathVistaAnswerType::Integer, None, None, "14");
        assert_eq!(extract_mathvista_answer(" 14 ", &integer, None), "14");
        assert_eq!(extract_mathvista_answer("The number missing is 14.", &integer, None), "14");
        assert_eq!(extract_mathvista_answer("From 1,200 down to 14", &integer, None), "14");
        assert_eq!(normalize_mathvista_answer("14.9", &integer).as_deref(), Some("14")); // int() truncates
        assert_eq!(normalize_mathvista_answer("-3.5", &integer).as_deref(), Some("-3"));
        assert_eq!(normalize_mathvista_answer("fourteen", &integer), None);
        assert!(mathvista_is_correct("The answer is \"14\".", &integer, None));

        let float = mathvista(MathVistaQuestionType::FreeForm, MathVistaAnswerType::Float, None, Some(2.0), "1.45");
        assert_eq!(extract_mathvista_answer("1.450", &float, None), "1.45"); // str(float(x))
        assert_eq!(normalize_mathvista_answer("1.4537", &float).as_deref(), Some("1.45"));
        assert!(mathvista_is_correct("Luca needs $1.45 in total.", &float, None));
        let one_decimal =
            mathvista(MathVistaQuestionType::FreeForm, MathVistaAnswerType::Float, None, Some(1.0), "3.0");
        assert_eq!(normalize_mathvista_answer("3", &one_decimal).as_deref(), Some("3.0"));
        let no_precision = mathvista(MathVistaQuestionType::FreeForm, MathVistaAnswerType::Float, None, None, "3.0");
        assert_eq!(normalize_mathvista_answer("3", &no_precision), None);
    }

    #[test]
    fn mathvista_rules_stand_in_without_an_llm() {
        let list = mathvista(MathVistaQuestionType::FreeForm, MathVistaAnswerType::List, None, None, "[2007, 2008]");
        assert!(mathvista_is_correct("The peak lies in [2007, 2008].", &list, None));

        let text = mathvista(MathVistaQuestionType::FreeForm, MathVistaAnswerType::Text, None, None, "Paris");
        assert_eq!(extract_mathvista_answer("  Paris ", &text, None), "Paris");
        assert_eq!(extract_mathvista_answer("", &text, None), "");

        // The official --quick_extract rule is one of the stand-ins without an LLM.
        assert_eq!(extract_mathvista_answer("Capital. The answer is \"Paris\".", &text, None), "Paris");
    }

    #[test]
    fn mathvista_with_an_llm_every_response_past_the_direct_checks_goes_to_it() {
        let integer = mathvista(MathVistaQuestionType::FreeForm, MathVistaAnswerType::Integer, None, None, "3");
        let choice = mathvista(
            MathVistaQuestionType::MultiChoice,
            MathVistaAnswerType::Text,
            Some(&["3/11", "8/11"]),
            None,
            "8/11",
        );
        let asked = std::cell::RefCell::new(Vec::new());
        let llm = |query: &str, response: &str| {
            asked.borrow_mut().push(response.to_string());
            assert!(query.starts_with("Hint:"));
            match response {
                "three apples" => Some("3".to_string()),
                "The answer is \"5\"." => Some("4".to_string()),
                "It is (B) 8/11." => Some("B".to_string()),
                _ => None,
            }
        };
        let llm = Some(&llm as LlmAnswerExtractor);
        assert_eq!(extract_mathvista_answer("three apples", &integer, llm), "3");
        // No rule runs before it: not the last number, not the quoted answer (that is --quick_extract, off by default).
        assert_eq!(extract_mathvista_answer("The answer is \"5\".", &integer, llm), "4");
        assert_eq!(extract_mathvista_answer("It is (B) 8/11.", &choice, llm), "B");
        // A failed extraction is "", which then fails normalisation of an integer.
        assert_eq!(extract_mathvista_answer("no idea", &integer, llm), "");
        assert!(!mathvista_is_correct("no idea", &integer, llm));
        // The direct checks never ask: empty, a choice's text, int(response).
        assert_eq!(extract_mathvista_answer("", &integer, llm), "");
        assert_eq!(extract_mathvista_answer("8/11", &choice, llm), "8/11");
        assert_eq!(extract_mathvista_answer(" +3 ", &integer, llm), "3");
        assert_eq!(*asked.borrow(), ["three apples", "The answer is \"5\".", "It is (B) 8/11.", "no idea", "no idea"]);
    }

    #[test]
    fn mathvista_empty_multi_choice_extraction_picks_the_shortest_choice() {
        // get_most_similar("", choices): the distance is each choice's length; the first minimum wins.
        let problem = mathvista(
            MathVistaQuestionType::MultiChoice,
            MathVistaAnswerType::Text,
            Some(&["yes!", "no", "ok"]),
            None,
            "no",
        );
        assert_eq!(normalize_mathvista_answer("", &problem).as_deref(), Some("no"));
        assert_eq!(normalize_mathvista_answer("  ", &problem).as_deref(), Some("no"));
    }

    #[test]
    fn levenshtein_distance() {
        use strsim::levenshtein;
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("héllo", "hello"), 1);
    }
}
