//! Loaders turning each benchmark's published files, laid out as LLaVA-1.5's
//! `playground/data/eval/<benchmark>/` folders or, for ScienceQA, ChartQA,
//! MMBench and MathVista, as their parquet releases on the Hugging Face hub,
//! into one item type with the prompt the LLaVA-1.5 evaluation scripts build;
//! and `score`, which grades a run's predictions against those items with the
//! rules in `metrics`.

use std::cell::Cell;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::LazyLock;

use base64::Engine;
use regex::Regex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::hub_parquet::{ImageColumn, ParquetRelease};
use super::judge::{
    llava_bench_rule, JudgeClient, JudgeError, LlavaBenchReviewInput, LLAVA_BENCH_JUDGE_MODEL,
    MATHVISTA_JUDGE_MODEL, MM_VET_JUDGE_MODEL,
};
use super::metrics::{
    chartqa_relaxed_correct, infer_option_letter, llava_bench_summary, mathvista_is_correct,
    mm_vet_summary, mmbench_accuracy, parse_scienceqa_letter, scienceqa_is_correct, vqa_accuracy,
    MathVistaAnswerType, MathVistaProblem, MathVistaQuestionType, Score, MMBENCH_CIRCULAR_STRIDE,
    OPTION_LETTERS, SCIENCEQA_OPTION_LETTERS,
};

const ANSWER_WITH_OPTION_LETTER: &str =
    "Answer with the option's letter from the given choices directly.";
const ANSWER_WITH_SINGLE_WORD: &str = "Answer the question using a single word or phrase.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Path(PathBuf),
    /// Encoded image file bytes (PNG/JPEG), as MMBench's TSV and the parquet releases embed them.
    Bytes(Vec<u8>),
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    pub id: String,
    pub image: ImageSource,
    /// The user prompt without the `<image>` token, as the LLaVA-1.5 scripts build it.
    pub question: String,
    /// What `score` needs: one of the `*Meta` structs below, as JSON.
    pub meta: Value,
}

impl EvalItem {
    pub fn meta_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.meta)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Benchmark {
    ScienceQa,
    TextVqa,
    ChartQa,
    LlavaBench,
    MmBench,
    MmVet,
    MathVista,
}

impl Benchmark {
    pub const ALL: [Benchmark; 7] = [
        Benchmark::ScienceQa,
        Benchmark::TextVqa,
        Benchmark::ChartQa,
        Benchmark::LlavaBench,
        Benchmark::MmBench,
        Benchmark::MmVet,
        Benchmark::MathVista,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Benchmark::ScienceQa => "scienceqa",
            Benchmark::TextVqa => "textvqa",
            Benchmark::ChartQa => "chartqa",
            Benchmark::LlavaBench => "llava-bench",
            Benchmark::MmBench => "mmbench",
            Benchmark::MmVet => "mm-vet",
            Benchmark::MathVista => "mathvista",
        }
    }

    /// The judge model the benchmark's official script calls, for those graded or read by one.
    pub fn official_judge_model(self) -> Option<&'static str> {
        match self {
            Benchmark::LlavaBench => Some(LLAVA_BENCH_JUDGE_MODEL),
            Benchmark::MmVet => Some(MM_VET_JUDGE_MODEL),
            Benchmark::MathVista => Some(MATHVISTA_JUDGE_MODEL),
            _ => None,
        }
    }
}

impl fmt::Display for Benchmark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown benchmark {0:?}; expected one of scienceqa, textvqa, chartqa, llava-bench, mmbench, mm-vet, mathvista")]
pub struct UnknownBenchmark(pub String);

impl FromStr for Benchmark {
    type Err = UnknownBenchmark;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Benchmark::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownBenchmark(name.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalDataError {
    #[error("{benchmark}: missing {}; {origin}", path.display())]
    MissingFile {
        benchmark: Benchmark,
        path: PathBuf,
        origin: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: invalid JSON: {source}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Json {
        path: PathBuf,
        line: Option<usize>,
        source: serde_json::Error,
    },
    #[error("{}: invalid TSV: {source}", path.display())]
    Tsv { path: PathBuf, source: csv::Error },
    #[error("{}: not a readable parquet file ({error}); download it again", path.display())]
    Parquet {
        path: PathBuf,
        error: parquet::errors::ParquetError,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// MMBench: expand every question into all rotations of its options
    /// (LLaVA's `--all-rounds`), for circular evaluation. Rows whose index is
    /// already >= 1e6 are the TSV's own circular copies and are then skipped.
    pub mmbench_circular: bool,
}

pub fn load(benchmark: Benchmark, data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    load_with_options(benchmark, data_dir, &LoadOptions::default())
}

pub fn load_with_options(
    benchmark: Benchmark,
    data_dir: &Path,
    options: &LoadOptions,
) -> Result<Vec<EvalItem>, EvalDataError> {
    match benchmark {
        Benchmark::ScienceQa => load_scienceqa(data_dir),
        Benchmark::TextVqa => load_textvqa(data_dir),
        Benchmark::ChartQa => load_chartqa(data_dir),
        Benchmark::LlavaBench => load_llava_bench(data_dir),
        Benchmark::MmBench => load_mmbench(data_dir, options.mmbench_circular),
        Benchmark::MmVet => load_mm_vet(data_dir),
        Benchmark::MathVista => load_mathvista(data_dir),
    }
}

// ---------------------------------------------------------------- file helpers

fn require(benchmark: Benchmark, path: PathBuf, origin: &str) -> Result<PathBuf, EvalDataError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(EvalDataError::MissingFile {
            benchmark,
            path,
            origin: origin.to_string(),
        })
    }
}

fn read_text(path: &Path) -> Result<String, EvalDataError> {
    std::fs::read_to_string(path).map_err(|source| EvalDataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, EvalDataError> {
    serde_json::from_str(&read_text(path)?).map_err(|source| EvalDataError::Json {
        path: path.to_path_buf(),
        line: None,
        source,
    })
}

fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, EvalDataError> {
    read_text(path)?
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|source| EvalDataError::Json {
                path: path.to_path_buf(),
                line: Some(i + 1),
                source,
            })
        })
        .collect()
}

/// The parquet release's shards, when the folder has them and none of
/// `layout_files` (the LLaVA layout, which is read when present).
fn parquet_instead(
    data_dir: &Path,
    layout_files: &[&str],
    release: &ParquetRelease,
) -> Result<Option<Vec<PathBuf>>, EvalDataError> {
    if layout_files.iter().any(|file| data_dir.join(file).exists()) {
        return Ok(None);
    }
    let files = release.files(data_dir)?;
    Ok((!files.is_empty()).then_some(files))
}

fn invalid(path: &Path, message: impl Into<String>) -> EvalDataError {
    EvalDataError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn to_meta(meta: impl Serialize) -> Value {
    serde_json::to_value(meta).expect("meta structs hold only strings, numbers and lists")
}

/// Python's `str()` of a JSON scalar: strings as they are, numbers as written.
fn json_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
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

// ---------------------------------------------------------------- ScienceQA

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScienceQaMeta {
    pub answer_index: usize,
    pub num_choices: usize,
}

#[derive(Deserialize)]
struct LlavaConversationRecord {
    id: Value,
    #[serde(default)]
    image: Option<String>,
    conversations: Vec<ConversationTurn>,
}

#[derive(Deserialize)]
struct ConversationTurn {
    from: String,
    value: String,
}

#[derive(Deserialize)]
struct ScienceQaProblem {
    choices: Vec<String>,
    answer: usize,
}

/// A row of the parquet release: a problem as `problems.json` has it, without its id.
#[derive(Deserialize)]
struct ScienceQaRow {
    question: String,
    hint: Option<String>,
    #[serde(flatten)]
    problem: ScienceQaProblem,
}

const SCIENCEQA_PARQUET: ParquetRelease = ParquetRelease {
    repo: "derek-thomas/ScienceQA",
    folders: &["data", ""],
    split: "test",
    image: ImageColumn::Optional("image"),
};

fn scienceqa_item(
    id: String,
    image: ImageSource,
    human_turn: &str,
    meta: ScienceQaMeta,
) -> EvalItem {
    EvalItem {
        id,
        image,
        question: format!(
            "{}\n{ANSWER_WITH_OPTION_LETTER}",
            human_turn.replace("<image>", "").trim()
        ),
        meta: to_meta(meta),
    }
}

fn load_scienceqa(data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    const BENCHMARK: Benchmark = Benchmark::ScienceQa;
    const LAYOUT_FILE: &str = "llava_test_CQM-A.json";
    if let Some(files) = parquet_instead(data_dir, &[LAYOUT_FILE], &SCIENCEQA_PARQUET)? {
        return load_scienceqa_parquet(&files);
    }
    let questions_path = require(
        BENCHMARK,
        data_dir.join(LAYOUT_FILE),
        &format!(
            "it comes with LLaVA's evaluation bundle (eval.zip, playground/data/eval/scienceqa); {}",
            SCIENCEQA_PARQUET.describe()
        ),
    )?;
    let images_dir = require(
        BENCHMARK,
        data_dir.join("images").join("test"),
        "unpack the ScienceQA test images (test.zip of the ScienceQA release) there as <id>/image.png",
    )?;
    let problems_path = data_dir.join("problems.json");
    let problems: Option<HashMap<String, ScienceQaProblem>> = if problems_path.exists() {
        Some(read_json(&problems_path)?)
    } else {
        None
    };
    let records: Vec<LlavaConversationRecord> = read_json(&questions_path)?;
    let mut items = Vec::new();
    // LLaVA reports ScienceQA-IMG: the questions that come with an image.
    for record in records {
        let Some(image) = record.image else { continue };
        let id = json_text(&record.id);
        let human_turn = record
            .conversations
            .iter()
            .find(|turn| turn.from == "human")
            .ok_or_else(|| invalid(&questions_path, format!("question {id} has no human turn")))?;
        let meta = match problems.as_ref().and_then(|p| p.get(&id)) {
            Some(problem) => ScienceQaMeta {
                answer_index: problem.answer,
                num_choices: problem.choices.len(),
            },
            None => scienceqa_meta_from_answer_turn(&record.conversations).ok_or_else(|| {
                invalid(
                    &questions_path,
                    format!(
                        "question {id}: no answer letter in its gpt turn and not in {}",
                        problems_path.display()
                    ),
                )
            })?,
        };
        items.push(scienceqa_item(
            id,
            ImageSource::Path(images_dir.join(image)),
            &human_turn.value,
            meta,
        ));
    }
    Ok(items)
}

/// Text-only problems are skipped as in the LLaVA layout; the release has no
/// problem ids, so items are named by their row in the split.
fn load_scienceqa_parquet(files: &[PathBuf]) -> Result<Vec<EvalItem>, EvalDataError> {
    let items = SCIENCEQA_PARQUET.read_records(files, |row, problem: ScienceQaRow, image| {
        Ok((!matches!(image, ImageSource::None)).then(|| {
            let meta = ScienceQaMeta {
                answer_index: problem.problem.answer,
                num_choices: problem.problem.choices.len(),
            };
            scienceqa_item(
                row.to_string(),
                image,
                &scienceqa_human_turn(&problem),
                meta,
            )
        }))
    })?;
    Ok(items.into_iter().flatten().collect())
}

/// The human turn of LLaVA-1.5's `llava_test_CQM-A.json` for a problem, as
/// lmms-eval's ScienceQA-IMG task rebuilds it from the same fields: the hint as
/// context when there is one, the question, then one "X. choice" line per choice.
fn scienceqa_human_turn(row: &ScienceQaRow) -> String {
    let mut turn = match row.hint.as_deref().filter(|hint| !hint.is_empty()) {
        Some(hint) => format!("Context: {hint}\n{}", row.question),
        None => row.question.clone(),
    };
    for (letter, choice) in OPTION_LETTERS.chars().zip(&row.problem.choices) {
        turn.push_str(&format!("\n{letter}. {choice}"));
    }
    turn
}

/// Without `problems.json` the answer is the letter of the file's gpt turn.
/// The option count is then unknown; taking all five letters cannot change
/// a verdict, since only the answer's own letter scores.
fn scienceqa_meta_from_answer_turn(conversations: &[ConversationTurn]) -> Option<ScienceQaMeta> {
    let answer = conversations.iter().find(|turn| turn.from == "gpt")?;
    let answer = answer.value.trim();
    let letter = parse_scienceqa_letter(answer.strip_prefix("Answer: ").unwrap_or(answer))?;
    Some(ScienceQaMeta {
        answer_index: SCIENCEQA_OPTION_LETTERS.iter().position(|&l| l == letter)?,
        num_choices: SCIENCEQA_OPTION_LETTERS.len(),
    })
}

// ---------------------------------------------------------------- TextVQA

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextVqaMeta {
    pub answers: Vec<String>,
    pub image_id: String,
}

#[derive(Deserialize)]
struct LlavaQuestionLine {
    question_id: Value,
    image: String,
    text: String,
}

#[derive(Deserialize)]
struct TextVqaAnnotations {
    data: Vec<TextVqaAnnotation>,
}

#[derive(Deserialize)]
struct TextVqaAnnotation {
    question_id: Value,
    image_id: String,
    question: String,
    answers: Vec<String>,
}

static OCR_TOKENS_QUESTION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)Question: (.*?) Short answer:").expect("valid regex"));

/// `prompt_processor` of LLaVA's `eval_textvqa.py`: the bare question of a
/// prompt, lowercased, used to find its annotation.
fn textvqa_question_from_prompt(prompt: &str) -> Option<String> {
    let lines: Vec<&str> = prompt.split('\n').collect();
    let question = if prompt.starts_with("OCR tokens: ") {
        OCR_TOKENS_QUESTION.captures(prompt)?.get(1)?.as_str()
    } else if prompt.contains("Reference OCR token: ") && lines.len() == 3 {
        if prompt.starts_with("Reference OCR token:") {
            lines[1]
        } else {
            lines[0]
        }
    } else if lines.len() == 2 {
        lines[0]
    } else {
        return None;
    };
    Some(question.to_lowercase())
}

fn load_textvqa(data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    const BENCHMARK: Benchmark = Benchmark::TextVqa;
    let questions_path = require(
        BENCHMARK,
        data_dir.join("llava_textvqa_val_v051_ocr.jsonl"),
        "it comes with LLaVA's evaluation bundle (eval.zip, playground/data/eval/textvqa)",
    )?;
    let annotations_path = require(
        BENCHMARK,
        data_dir.join("TextVQA_0.5.1_val.json"),
        "download the TextVQA v0.5.1 validation annotations from the TextVQA project",
    )?;
    let images_dir = require(
        BENCHMARK,
        data_dir.join("train_images"),
        "unpack TextVQA's train_val_images.zip there (validation images live in train_images)",
    )?;
    let annotations: TextVqaAnnotations = read_json(&annotations_path)?;
    // `eval_textvqa.py` joins on (image id, lowercased question); LLaVA's
    // question_id field holds the image id.
    let by_image_and_question: HashMap<(String, String), TextVqaAnnotation> = annotations
        .data
        .into_iter()
        .map(|a| ((a.image_id.clone(), a.question.to_lowercase()), a))
        .collect();
    read_jsonl::<LlavaQuestionLine>(&questions_path)?
        .into_iter()
        .map(|line| {
            let image_id = json_text(&line.question_id);
            let question = textvqa_question_from_prompt(&line.text).ok_or_else(|| {
                invalid(
                    &questions_path,
                    format!("unrecognised prompt layout: {:?}", line.text),
                )
            })?;
            let annotation = by_image_and_question
                .get(&(image_id.clone(), question.clone()))
                .ok_or_else(|| {
                    invalid(
                        &annotations_path,
                        format!("no annotation for image {image_id}, question {question:?}"),
                    )
                })?;
            Ok(EvalItem {
                id: json_text(&annotation.question_id),
                image: ImageSource::Path(images_dir.join(&line.image)),
                question: line.text,
                meta: to_meta(TextVqaMeta {
                    answers: annotation.answers.clone(),
                    image_id,
                }),
            })
        })
        .collect()
}

/// Item ids by the key `eval_textvqa.py` joins LLaVA's answer lines on: the
/// image id (their `question_id`) and the lowercased question of the prompt.
pub struct TextVqaAnswerIndex(HashMap<(String, String), String>);

impl TextVqaAnswerIndex {
    pub fn new(items: &[EvalItem]) -> Self {
        TextVqaAnswerIndex(
            items
                .iter()
                .filter_map(|item| {
                    let meta: TextVqaMeta = item.meta_as().ok()?;
                    let question = textvqa_question_from_prompt(&item.question)?;
                    Some(((meta.image_id, question), item.id.clone()))
                })
                .collect(),
        )
    }

    /// The item a LLaVA answer line belongs to, if any; `Err` when its prompt
    /// has a layout `prompt_processor` cannot read (the official script fails there too).
    pub fn item_id(&self, image_id: &str, prompt: &str) -> Result<Option<&str>, String> {
        let question = textvqa_question_from_prompt(prompt)
            .ok_or_else(|| format!("unrecognised TextVQA prompt layout: {prompt:?}"))?;
        Ok(self
            .0
            .get(&(image_id.to_string(), question))
            .map(String::as_str))
    }
}

// ---------------------------------------------------------------- ChartQA

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
fn chartqa_item(
    split: &str,
    position: usize,
    query: &str,
    label: String,
    image: ImageSource,
) -> EvalItem {
    EvalItem {
        id: format!("{split}_{position}"),
        image,
        question: format!("{query}\n{ANSWER_WITH_SINGLE_WORD}"),
        meta: to_meta(ChartQaMeta {
            label,
            split: split.to_string(),
        }),
    }
}

fn load_chartqa(data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    const BENCHMARK: Benchmark = Benchmark::ChartQa;
    if let Some(files) = parquet_instead(data_dir, &CHARTQA_SPLIT_FILES, &CHARTQA_PARQUET)? {
        return load_chartqa_parquet(&files);
    }
    let origin = format!(
        "it is in the test/ folder of the ChartQA release; {}",
        CHARTQA_PARQUET.describe()
    );
    let split_paths = CHARTQA_SPLIT_FILES
        .iter()
        .map(|file| require(BENCHMARK, data_dir.join(file), &origin))
        .collect::<Result<Vec<_>, _>>()?;
    let images_dir = require(BENCHMARK, data_dir.join("png"), &origin)?;
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
            return Err(format!(
                "human_or_machine is {split}; expected 0 (human) or 1 (machine)"
            ));
        }
        let [label] = <[String; 1]>::try_from(row.label)
            .map_err(|labels| format!("{} labels; expected one", labels.len()))?;
        split_sizes[split] += 1;
        Ok(chartqa_item(
            CHARTQA_SPLITS[split],
            split_sizes[split] - 1,
            &row.query,
            label,
            image,
        ))
    })
}

// ---------------------------------------------------------------- LLaVA-Bench (in-the-wild)

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
    const BENCHMARK: Benchmark = Benchmark::LlavaBench;
    const ORIGIN: &str =
        "it is part of the llava-bench-in-the-wild dataset that LLaVA's evaluation guide \
        downloads into playground/data/eval/llava-bench-in-the-wild";
    let questions_path = require(BENCHMARK, data_dir.join("questions.jsonl"), ORIGIN)?;
    let context_path = require(BENCHMARK, data_dir.join("context.jsonl"), ORIGIN)?;
    let answers_path = require(BENCHMARK, data_dir.join("answers_gpt4.jsonl"), ORIGIN)?;
    let images_dir = require(BENCHMARK, data_dir.join("images"), ORIGIN)?;
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
            let context = captions.get(&question.image).ok_or_else(|| {
                invalid(
                    &context_path,
                    format!("no caption for image {}", question.image),
                )
            })?;
            let reference_answer = reference_answers.get(&id).ok_or_else(|| {
                invalid(&answers_path, format!("no GPT-4 answer for question {id}"))
            })?;
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

// ---------------------------------------------------------------- MMBench

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmBenchMeta {
    /// The TSV index of this variant; variants of one question share `index % 1e6`.
    pub index: u64,
    /// The correct letter in this variant's option order; absent in test splits.
    pub answer: Option<String>,
    /// Option texts in the order they were shown, lettered from A.
    pub options: Vec<String>,
    pub category: Option<String>,
}

/// What pandas reads as NaN by default, plus the spellings LLaVA's `is_none` rejects.
fn is_missing_cell(cell: &str) -> bool {
    const PANDAS_NA_VALUES: [&str; 19] = [
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
    ];
    PANDAS_NA_VALUES.contains(&cell)
        || cell.eq_ignore_ascii_case("nan")
        || cell.eq_ignore_ascii_case("none")
}

struct MmBenchRow {
    index: u64,
    question: String,
    hint: Option<String>,
    options: Vec<String>,
    answer: Option<String>,
    category: Option<String>,
    image: ImageSource,
}

impl MmBenchRow {
    /// A row from its cells by column name (`None` where the column or the value is absent).
    fn new(cell: impl Fn(&str) -> Option<String>, image: ImageSource) -> Result<Self, String> {
        let index = cell("index").unwrap_or_default();
        let present = |name: &str| cell(name).filter(|value| !is_missing_cell(value));
        Ok(MmBenchRow {
            index: index
                .trim()
                .parse()
                .map_err(|_| format!("index {index:?} is not a whole number"))?,
            question: cell("question").ok_or("no question")?,
            hint: present("hint"),
            // LLaVA reads options A-D in order and stops at the first missing one.
            options: ["A", "B", "C", "D"]
                .into_iter()
                .map_while(present)
                .collect(),
            answer: present("answer"),
            category: present("category"),
            image,
        })
    }
}

const MMBENCH_TSV: &str = "mmbench_dev_20230712.tsv";

/// lmms-lab/MMBench's `en` configuration (lmms-lab/MMBench_EN keeps the same
/// columns under data/); its `index` is a string, MMBench_EN's an integer.
const MMBENCH_PARQUET: ParquetRelease = ParquetRelease {
    repo: "lmms-lab/MMBench",
    folders: &["en", "data", ""],
    split: "dev",
    image: ImageColumn::Required("image"),
};

/// `model_vqa_mmbench.py`: hint, question, then one "X. option" line per option.
fn mmbench_prompt(hint: Option<&str>, question: &str, options: &[String]) -> String {
    let mut prompt = match hint {
        Some(hint) => format!("{hint}\n{question}"),
        None => question.to_string(),
    };
    for (letter, option) in OPTION_LETTERS.chars().zip(options) {
        prompt.push_str(&format!("\n{letter}. {option}"));
    }
    format!("{prompt}\n{ANSWER_WITH_OPTION_LETTER}")
}

fn read_mmbench_rows(path: &Path) -> Result<Vec<MmBenchRow>, EvalDataError> {
    let tsv_error = |source| EvalDataError::Tsv {
        path: path.to_path_buf(),
        source,
    };
    // `flexible`: short rows read as missing cells, as pandas reads them as NaN.
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .flexible(true)
        .from_path(path)
        .map_err(tsv_error)?;
    let headers = reader.headers().map_err(tsv_error)?.clone();
    let column = |name: &str| headers.iter().position(|header| header == name);
    for name in ["index", "question", "image"] {
        column(name).ok_or_else(|| invalid(path, format!("no `{name}` column")))?;
    }

    let mut encoded_images: HashMap<u64, String> = HashMap::new();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(tsv_error)?;
        let cell = |name: &str| column(name).and_then(|c| record.get(c)).map(str::to_string);
        let line = record.position().map_or(0, csv::Position::line);
        let row = MmBenchRow::new(cell, ImageSource::None)
            .map_err(|message| invalid(path, format!("line {line}: {message}")))?;
        encoded_images.insert(row.index, cell("image").unwrap_or_default());
        rows.push(row);
    }
    for row in &mut rows {
        row.image = ImageSource::Bytes(decode_mmbench_image(path, row.index, &encoded_images)?);
    }
    Ok(rows)
}

fn read_mmbench_parquet(files: &[PathBuf]) -> Result<Vec<MmBenchRow>, EvalDataError> {
    MMBENCH_PARQUET.read_records(files, |_, cells: serde_json::Map<String, Value>, image| {
        MmBenchRow::new(
            |name| {
                cells
                    .get(name)
                    .filter(|value| !value.is_null())
                    .map(json_text)
            },
            image,
        )
    })
}

/// MMBench TSVs store a repeated image once; other rows hold (at most 64
/// characters of) the index of the row that has it.
fn decode_mmbench_image(
    path: &Path,
    index: u64,
    encoded_images: &HashMap<u64, String>,
) -> Result<Vec<u8>, EvalDataError> {
    const MAX_REFERENCE_LEN: usize = 64;
    let mut encoded = &encoded_images[&index];
    if encoded.len() <= MAX_REFERENCE_LEN {
        encoded = encoded
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|referenced| encoded_images.get(&referenced))
            .filter(|referenced| referenced.len() > MAX_REFERENCE_LEN)
            .ok_or_else(|| {
                invalid(
                    path,
                    format!("row {index}: image {encoded:?} is neither base64 nor a row index"),
                )
            })?;
    }
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| invalid(path, format!("row {index}: image is not valid base64: {e}")))
}

fn load_mmbench(data_dir: &Path, circular: bool) -> Result<Vec<EvalItem>, EvalDataError> {
    // Where the rows come from, for errors about one of them.
    let (path, rows) = match parquet_instead(data_dir, &[MMBENCH_TSV], &MMBENCH_PARQUET)? {
        Some(files) => (data_dir.to_path_buf(), read_mmbench_parquet(&files)?),
        None => {
            let path = require(
                Benchmark::MmBench,
                data_dir.join(MMBENCH_TSV),
                &format!(
                    "download the MMBench dev TSV (LLaVA's evaluation guide puts it in playground/data/eval/mmbench); {}",
                    MMBENCH_PARQUET.describe()
                ),
            )?;
            let rows = read_mmbench_rows(&path)?;
            (path, rows)
        }
    };
    let mut items = Vec::new();
    for row in rows {
        if !circular {
            items.push(mmbench_item(
                &row,
                row.index,
                row.options.clone(),
                row.answer.clone(),
            ));
            continue;
        }
        if row.index >= MMBENCH_CIRCULAR_STRIDE {
            continue;
        }
        let answer_position = match &row.answer {
            Some(answer) => Some(
                (0..row.options.len())
                    .position(|p| answer == &option_letter(p))
                    .ok_or_else(|| {
                        invalid(
                            &path,
                            format!("row {}: answer {answer:?} is not an option", row.index),
                        )
                    })?,
            ),
            None => None,
        };
        let count = row.options.len();
        for shift in 0..count {
            let mut rotated = row.options.clone();
            rotated.rotate_left(shift);
            let answer = answer_position.map(|p| option_letter((p + count - shift) % count));
            items.push(mmbench_item(
                &row,
                row.index + shift as u64 * MMBENCH_CIRCULAR_STRIDE,
                rotated,
                answer,
            ));
        }
    }
    Ok(items)
}

fn option_letter(position: usize) -> String {
    OPTION_LETTERS[position..=position].to_string()
}

fn mmbench_item(
    row: &MmBenchRow,
    index: u64,
    options: Vec<String>,
    answer: Option<String>,
) -> EvalItem {
    EvalItem {
        id: index.to_string(),
        image: row.image.clone(),
        question: mmbench_prompt(row.hint.as_deref(), &row.question, &options),
        meta: to_meta(MmBenchMeta {
            index,
            answer,
            options,
            category: row.category.clone(),
        }),
    }
}

// ---------------------------------------------------------------- MM-Vet

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
    let path = require(Benchmark::MmVet, data_dir.join("mm-vet.json"), ORIGIN)?;
    let images_dir = require(Benchmark::MmVet, data_dir.join("images"), ORIGIN)?;
    // The file's order, in which the official grader iterates and sums.
    let records: serde_json::Map<String, Value> = read_json(&path)?;
    records
        .into_iter()
        .map(|(id, record)| {
            let record: MmVetRecord =
                serde_json::from_value(record).map_err(|source| EvalDataError::Json {
                    path: path.clone(),
                    line: None,
                    source,
                })?;
            Ok(EvalItem {
                id,
                image: ImageSource::Path(images_dir.join(&record.imagename)),
                question: record.question,
                meta: to_meta(MmVetMeta {
                    answer: record.answer,
                    capabilities: record.capability,
                }),
            })
        })
        .collect()
}

// ---------------------------------------------------------------- MathVista

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
    query: String,
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

fn mathvista_item(record: MathVistaRecord, image: ImageSource) -> EvalItem {
    let pid = json_text(&record.pid);
    let problem = MathVistaProblem {
        query: record.query,
        question_type: record.question_type,
        answer_type: record.answer_type,
        choices: record
            .choices
            .map(|choices| choices.iter().map(json_text).collect()),
        precision: record.precision,
        answer: json_text(&record.answer),
    };
    EvalItem {
        id: pid.clone(),
        image,
        question: problem.query.clone(),
        meta: to_meta(MathVistaMeta { pid, problem }),
    }
}

fn load_mathvista(data_dir: &Path) -> Result<Vec<EvalItem>, EvalDataError> {
    let mut items = match parquet_instead(data_dir, &MATHVISTA_JSON, &MATHVISTA_PARQUET)? {
        Some(files) => MATHVISTA_PARQUET
            .read_records(&files, |_, record, image| Ok(mathvista_item(record, image)))?,
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
            Value::Object(by_pid) => by_pid
                .into_iter()
                .map(|(_, problem)| problem)
                .collect::<Vec<_>>(),
            Value::Array(problems) => problems,
            _ => {
                return Err(invalid(
                    &json_path,
                    "expected an object keyed by pid or a list of problems",
                ))
            }
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
            benchmark: Benchmark::MathVista,
            path: json_path,
            origin: format!(
                "or {} instead, with MathVista's images.zip unpacked beside it; {}",
                jsonl_path.display(),
                MATHVISTA_PARQUET.describe()
            ),
        });
    };
    let images_dir = require(
        Benchmark::MathVista,
        data_dir.join("images"),
        "unpack MathVista's images.zip there",
    )?;
    Ok(records
        .into_iter()
        .map(|record| {
            let image = record
                .image
                .strip_prefix("images/")
                .unwrap_or(&record.image);
            let image = ImageSource::Path(images_dir.join(image));
            mathvista_item(record, image)
        })
        .collect())
}

// ---------------------------------------------------------------- scoring

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("no prediction for item {0}")]
    MissingPrediction(String),
    #[error("{0} is graded by an LLM judge; a JudgeClient is required")]
    JudgeRequired(Benchmark),
    #[error("item {id}: metadata does not fit {benchmark}: {source}")]
    InvalidMeta {
        benchmark: Benchmark,
        id: String,
        source: serde_json::Error,
    },
    #[error("item {0} has no ground-truth answer (a test split?)")]
    MissingAnswer(String),
    #[error(transparent)]
    Judge(#[from] JudgeError),
}

/// Grades `predictions` (item id -> generated text) for `items` loaded for
/// `benchmark`. Predictions are trimmed, as LLaVA's generation scripts strip
/// their outputs. LLaVA-Bench and MM-Vet need `judge`; MathVista, given one,
/// extracts answers with it as `extract_answer.py` does (rules stand in without).
pub fn score(
    benchmark: Benchmark,
    items: &[EvalItem],
    predictions: &HashMap<String, String>,
    judge: Option<&JudgeClient>,
) -> Result<Score, ScoreError> {
    let graded = items
        .iter()
        .map(|item| match predictions.get(&item.id) {
            Some(prediction) => Ok(Graded {
                item,
                prediction: prediction.trim(),
            }),
            None => Err(ScoreError::MissingPrediction(item.id.clone())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    match benchmark {
        Benchmark::ScienceQa => {
            count_correct(benchmark, &graded, |meta: ScienceQaMeta, prediction| {
                Ok(f64::from(u8::from(scienceqa_is_correct(
                    prediction,
                    meta.answer_index,
                    meta.num_choices,
                ))))
            })
        }
        Benchmark::TextVqa => count_correct(benchmark, &graded, |meta: TextVqaMeta, prediction| {
            Ok(vqa_accuracy(prediction, &meta.answers))
        }),
        Benchmark::ChartQa => score_chartqa(&graded),
        Benchmark::MmBench => score_mmbench(&graded),
        Benchmark::MathVista => score_mathvista(&graded, judge),
        Benchmark::LlavaBench => {
            score_llava_bench(&graded, judge.ok_or(ScoreError::JudgeRequired(benchmark))?)
        }
        Benchmark::MmVet => {
            score_mm_vet(&graded, judge.ok_or(ScoreError::JudgeRequired(benchmark))?)
        }
    }
}

struct Graded<'a> {
    item: &'a EvalItem,
    prediction: &'a str,
}

impl Graded<'_> {
    fn meta<T: DeserializeOwned>(&self, benchmark: Benchmark) -> Result<T, ScoreError> {
        self.item
            .meta_as()
            .map_err(|source| ScoreError::InvalidMeta {
                benchmark,
                id: self.item.id.clone(),
                source,
            })
    }
}

/// Sums a per-item score over all items.
fn count_correct<M: DeserializeOwned>(
    benchmark: Benchmark,
    graded: &[Graded],
    item_score: impl Fn(M, &str) -> Result<f64, ScoreError>,
) -> Result<Score, ScoreError> {
    let mut correct = 0.0;
    for entry in graded {
        correct += item_score(entry.meta(benchmark)?, entry.prediction)?;
    }
    Ok(Score::new(benchmark.name(), correct, graded.len()))
}

fn score_chartqa(graded: &[Graded]) -> Result<Score, ScoreError> {
    let mut by_split: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for entry in graded {
        let meta: ChartQaMeta = entry.meta(Benchmark::ChartQa)?;
        let split = by_split.entry(meta.split).or_default();
        split.0 += f64::from(u8::from(chartqa_relaxed_correct(
            entry.prediction,
            &meta.label,
        )));
        split.1 += 1;
    }
    let correct = by_split.values().map(|(correct, _)| correct).sum();
    let mut score = Score::new(Benchmark::ChartQa.name(), correct, graded.len());
    for (split, (correct, total)) in by_split {
        score = score.with_extra(
            &format!("{split}_accuracy"),
            Score::new(split.as_str(), correct, total).accuracy,
        );
    }
    Ok(score)
}

/// The headline is circular accuracy; with one variant per question it
/// equals plain accuracy.
fn score_mmbench(graded: &[Graded]) -> Result<Score, ScoreError> {
    let mut results = Vec::with_capacity(graded.len());
    for entry in graded {
        let meta: MmBenchMeta = entry.meta(Benchmark::MmBench)?;
        let answer = meta
            .answer
            .ok_or_else(|| ScoreError::MissingAnswer(entry.item.id.clone()))?;
        let chosen = infer_option_letter(entry.prediction, &meta.options);
        results.push((
            meta.index,
            chosen.is_some_and(|letter| answer == letter.to_string()),
        ));
    }
    let accuracy = mmbench_accuracy(&results);
    let plain = Score::new("plain", accuracy.correct as f64, accuracy.total);
    Ok(Score::new(
        Benchmark::MmBench.name(),
        accuracy.circular_correct as f64,
        accuracy.circular_groups,
    )
    .with_extra("plain_accuracy", plain.accuracy)
    .with_extra("plain_correct", accuracy.correct)
    .with_extra("plain_total", accuracy.total))
}

fn score_mathvista(graded: &[Graded], judge: Option<&JudgeClient>) -> Result<Score, ScoreError> {
    let extraction_failures = Cell::new(0u64);
    let extract_with_judge = |judge: &JudgeClient, query: &str, response: &str| {
        judge
            .extract_mathvista_answer(query, response)
            .inspect_err(|_| extraction_failures.set(extraction_failures.get() + 1))
            .ok()
    };
    let llm = judge
        .map(|judge| move |query: &str, response: &str| extract_with_judge(judge, query, response));
    let llm_extractor = llm
        .as_ref()
        .map(|extract| extract as &dyn Fn(&str, &str) -> Option<String>);
    let mut score = count_correct(
        Benchmark::MathVista,
        graded,
        |meta: MathVistaMeta, prediction| {
            Ok(f64::from(u8::from(mathvista_is_correct(
                prediction,
                &meta.problem,
                llm_extractor,
            ))))
        },
    )?;
    if judge.is_some() {
        score = score.with_extra("llm_extraction_failures", extraction_failures.get());
    }
    Ok(score)
}

/// Reviews that the judge answers without two scores enter as `[-1, -1]`,
/// as in `eval_gpt_review_bench.py`; transport and HTTP failures abort.
fn score_llava_bench(graded: &[Graded], judge: &JudgeClient) -> Result<Score, ScoreError> {
    let mut reviews = Vec::with_capacity(graded.len());
    for entry in graded {
        let meta: LlavaBenchMeta = entry.meta(Benchmark::LlavaBench)?;
        let rule = llava_bench_rule(&meta.category).ok_or_else(|| ScoreError::InvalidMeta {
            benchmark: Benchmark::LlavaBench,
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
        let scores = match judge.review_llava_bench(&input) {
            Ok(scores) => scores,
            // A reply the judge client could not read counts like an unreadable score; its stats count it.
            Err(JudgeError::UnparsableScore { .. } | JudgeError::MalformedReply { .. }) => [-1.0, -1.0],
            Err(error) => return Err(error.into()),
        };
        reviews.push((meta.category, scores));
    }
    let summary = llava_bench_summary(&reviews);
    let model_total = reviews.iter().map(|(_, scores)| scores[1]).sum();
    let mut score = Score::new(Benchmark::LlavaBench.name(), model_total, graded.len());
    score.accuracy = summary.get("all").map_or(0.0, |all| all.relative / 100.0);
    Ok(score.with_extra("categories", to_meta(summary)))
}

/// Grades the judge cannot give after its re-asks count 0.0, as in MM-Vet's
/// grader. The headline is the official table's rounded total.
fn score_mm_vet(graded: &[Graded], judge: &JudgeClient) -> Result<Score, ScoreError> {
    let mut grades = Vec::with_capacity(graded.len());
    for entry in graded {
        let meta: MmVetMeta = entry.meta(Benchmark::MmVet)?;
        let grade = match judge.grade_mm_vet(&entry.item.question, &meta.answer, entry.prediction) {
            Ok(grade) => grade,
            Err(JudgeError::UnparsableScore { .. }) => 0.0,
            Err(error) => return Err(error.into()),
        };
        grades.push((meta.capabilities, grade));
    }
    let summary = mm_vet_summary(&grades);
    let total = grades.iter().map(|(_, grade)| grade).sum();
    let mut score = Score::new(Benchmark::MmVet.name(), total, graded.len());
    score.accuracy = summary.total / 100.0;
    Ok(score.with_extra("by_capability_percent", to_meta(summary.by_capability)))
}

#[cfg(test)]
mod tests {
    use super::super::judge::test_support::{completion, test_client, StubServer};
    use super::*;
    use serde_json::json;

    /// A 1x1 grey PNG.
    const TINY_PNG_BASE64: &str =
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAsTj2FAAAAABJRU5ErkJggg==";

    fn write(dir: &Path, relative: &str, content: &str) {
        let path = dir.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    fn jsonl(lines: &[Value]) -> String {
        lines.iter().map(|line| format!("{line}\n")).collect()
    }

    fn predictions(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(id, text)| (id.to_string(), text.to_string()))
            .collect()
    }

    fn missing_file_message(benchmark: Benchmark, dir: &Path) -> String {
        let error = load(benchmark, dir).unwrap_err();
        assert!(
            matches!(error, EvalDataError::MissingFile { .. }),
            "{error}"
        );
        error.to_string()
    }

    #[test]
    fn benchmark_names_round_trip() {
        for benchmark in Benchmark::ALL {
            assert_eq!(benchmark.name().parse::<Benchmark>().unwrap(), benchmark);
            assert_eq!(benchmark.to_string(), benchmark.name());
        }
        assert_eq!("MM-Vet".parse::<Benchmark>().unwrap(), Benchmark::MmVet);
        let error = "vqav2".parse::<Benchmark>().unwrap_err();
        assert!(error.to_string().contains("llava-bench"));
    }

    #[test]
    fn natural_order_sorts_trailing_numbers_by_value() {
        let mut ids = vec!["v1_10", "v1_2", "v1_1", "10", "9"];
        ids.sort_by(|a, b| natural_order(a, b));
        assert_eq!(ids, ["9", "10", "v1_1", "v1_2", "v1_10"]);
    }

    fn scienceqa_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let records = json!([
            { "id": "4", "image": "4/image.png", "conversations": [
                { "from": "human", "value": "<image>\nContext: Select the best answer.\nWhich property do these three objects have in common?\nA. shiny\nB. slippery\nC. opaque" },
                { "from": "gpt", "value": "C" } ] },
            { "id": "5", "conversations": [
                { "from": "human", "value": "Which word comes first?\nA. cat\nB. dog" },
                { "from": "gpt", "value": "A" } ] },
            { "id": "7", "image": "7/image.png", "conversations": [
                { "from": "human", "value": "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) whale\n<image>" },
                { "from": "gpt", "value": "Answer: The answer is B." } ] }
        ]);
        write(dir.path(), "llava_test_CQM-A.json", &records.to_string());
        std::fs::create_dir_all(dir.path().join("images/test")).unwrap();
        dir
    }

    #[test]
    fn scienceqa_keeps_image_questions_with_llava_prompt() {
        let dir = scienceqa_dir();
        let items = load(Benchmark::ScienceQa, dir.path()).unwrap();
        assert_eq!(items.len(), 2, "the text-only question is skipped");
        assert_eq!(items[0].id, "4");
        assert_eq!(
            items[0].image,
            ImageSource::Path(dir.path().join("images/test/4/image.png"))
        );
        assert_eq!(
            items[0].question,
            "Context: Select the best answer.\nWhich property do these three objects have in common?\nA. shiny\nB. slippery\nC. opaque\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(
            items[0].meta_as::<ScienceQaMeta>().unwrap(),
            ScienceQaMeta {
                answer_index: 2,
                num_choices: 5
            }
        );
        assert_eq!(
            items[1].question,
            "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) whale\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(items[1].meta_as::<ScienceQaMeta>().unwrap().answer_index, 1);
    }

    #[test]
    fn scienceqa_prefers_problems_json_answers() {
        let dir = scienceqa_dir();
        let problems = json!({
            "4": { "choices": ["shiny", "slippery", "opaque"], "answer": 2, "image": "image.png" },
            "7": { "choices": ["frog", "whale"], "answer": 1, "image": "image.png" }
        });
        write(dir.path(), "problems.json", &problems.to_string());
        let items = load(Benchmark::ScienceQa, dir.path()).unwrap();
        assert_eq!(
            items[0].meta_as::<ScienceQaMeta>().unwrap(),
            ScienceQaMeta {
                answer_index: 2,
                num_choices: 3
            }
        );
        assert_eq!(
            items[1].meta_as::<ScienceQaMeta>().unwrap(),
            ScienceQaMeta {
                answer_index: 1,
                num_choices: 2
            }
        );
    }

    #[test]
    fn scienceqa_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let message = missing_file_message(Benchmark::ScienceQa, dir.path());
        assert!(
            message.contains("llava_test_CQM-A.json")
                && message.contains("eval.zip")
                && message.contains("derek-thomas/ScienceQA's parquet release")
                && message.contains("data/test-*.parquet or test-*.parquet"),
            "{message}"
        );
        write(dir.path(), "llava_test_CQM-A.json", "[]");
        let message = missing_file_message(Benchmark::ScienceQa, dir.path());
        assert!(
            message.contains("images/test") && message.contains("test.zip"),
            "{message}"
        );
    }

    #[test]
    fn scienceqa_parquet_rows_rebuild_the_llava_human_turn() {
        let row = |hint: Option<&str>| ScienceQaRow {
            question: "Which animal is shown?".to_string(),
            hint: hint.map(str::to_string),
            problem: ScienceQaProblem {
                choices: vec!["dog".to_string(), "cat".to_string()],
                answer: 1,
            },
        };
        assert_eq!(
            scienceqa_human_turn(&row(Some("Look at the picture."))),
            "Context: Look at the picture.\nWhich animal is shown?\nA. dog\nB. cat"
        );
        let no_context = "Which animal is shown?\nA. dog\nB. cat";
        assert_eq!(scienceqa_human_turn(&row(Some(""))), no_context);
        assert_eq!(scienceqa_human_turn(&row(None)), no_context);
    }

    #[test]
    fn scienceqa_scoring_counts_parsable_correct_letters() {
        let dir = scienceqa_dir();
        let items = load(Benchmark::ScienceQa, dir.path()).unwrap();
        let score = score(
            Benchmark::ScienceQa,
            &items,
            &predictions(&[("4", "C\n"), ("7", "A")]),
            None,
        )
        .unwrap();
        assert_eq!((score.correct, score.total, score.accuracy), (1.0, 2, 0.5));
        let error = super::score(
            Benchmark::ScienceQa,
            &items,
            &predictions(&[("4", "C")]),
            None,
        )
        .unwrap_err();
        assert!(matches!(error, ScoreError::MissingPrediction(id) if id == "7"));
    }

    fn textvqa_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let questions = jsonl(&[
            json!({ "question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "category": "default",
                "text": "what is the brand of this camera?\nReference OCR token: dakota, digital\nAnswer the question using a single word or phrase." }),
            json!({ "question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "category": "default",
                "text": "What Year is shown?\nAnswer the question using a single word or phrase." }),
        ]);
        write(dir.path(), "llava_textvqa_val_v051_ocr.jsonl", &questions);
        let mut answers = vec!["dakota"; 9];
        answers.push("dakota digital");
        let annotations = json!({ "dataset_name": "textvqa", "data": [
            { "question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901", "question_id": 34602, "answers": answers },
            { "question": "what year is shown?", "image_id": "003a8ae2ef43b901", "question_id": 34603, "answers": vec!["2008"; 10] }
        ]});
        write(
            dir.path(),
            "TextVQA_0.5.1_val.json",
            &annotations.to_string(),
        );
        std::fs::create_dir_all(dir.path().join("train_images")).unwrap();
        dir
    }

    #[test]
    fn textvqa_joins_questions_with_annotations() {
        let dir = textvqa_dir();
        let items = load(Benchmark::TextVqa, dir.path()).unwrap();
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["34602", "34603"]
        );
        assert_eq!(
            items[0].image,
            ImageSource::Path(dir.path().join("train_images/003a8ae2ef43b901.jpg"))
        );
        assert!(items[0]
            .question
            .starts_with("what is the brand of this camera?\nReference OCR token: dakota"));
        let meta: TextVqaMeta = items[0].meta_as().unwrap();
        assert_eq!(
            (meta.answers.len(), meta.image_id.as_str()),
            (10, "003a8ae2ef43b901")
        );

        let score = score(
            Benchmark::TextVqa,
            &items,
            &predictions(&[("34602", "Dakota."), ("34603", "2009")]),
            None,
        )
        .unwrap();
        // "dakota" matches 9 of 10 answers: every leave-one-out subset keeps >= 3 -> 1.0; "2009" -> 0.
        assert_eq!((score.correct, score.accuracy), (1.0, 0.5));
    }

    #[test]
    fn textvqa_prompt_processor_layouts() {
        let three_lines =
            "Q?\nReference OCR token: a\nAnswer the question using a single word or phrase.";
        assert_eq!(
            textvqa_question_from_prompt(three_lines).as_deref(),
            Some("q?")
        );
        let ocr_first = "Reference OCR token: a\nWhat Is It?\nAnswer the question using a single word or phrase.";
        assert_eq!(
            textvqa_question_from_prompt(ocr_first).as_deref(),
            Some("what is it?")
        );
        let ocr_tokens = "OCR tokens: a b Question: Who\nwon? Short answer:";
        assert_eq!(
            textvqa_question_from_prompt(ocr_tokens).as_deref(),
            Some("who\nwon?")
        );
        assert_eq!(textvqa_question_from_prompt("just one line"), None);
    }

    #[test]
    fn textvqa_unmatched_question_and_missing_files_are_errors() {
        let dir = textvqa_dir();
        write(
            dir.path(),
            "llava_textvqa_val_v051_ocr.jsonl",
            &jsonl(&[json!({
            "question_id": "ffff", "image": "ffff.jpg", "text": "who?\nAnswer the question using a single word or phrase." })]),
        );
        let error = load(Benchmark::TextVqa, dir.path()).unwrap_err();
        assert!(
            error.to_string().contains("no annotation for image ffff"),
            "{error}"
        );
        std::fs::remove_file(dir.path().join("TextVQA_0.5.1_val.json")).unwrap();
        let message = missing_file_message(Benchmark::TextVqa, dir.path());
        assert!(message.contains("TextVQA_0.5.1_val.json"), "{message}");
    }

    fn chartqa_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "test_human.json", &json!([
            { "imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?", "label": "14" }
        ]).to_string());
        write(dir.path(), "test_augmented.json", &json!([
            { "imgname": "multi_col_1.png", "query": "What is the value in 2019?", "label": 23.5 },
            { "imgname": "two_col_2.png", "query": "Which country is the largest?", "label": "Japan" }
        ]).to_string());
        std::fs::create_dir_all(dir.path().join("png")).unwrap();
        dir
    }

    #[test]
    fn chartqa_loads_both_splits_with_the_short_answer_prompt() {
        let dir = chartqa_dir();
        let items = load(Benchmark::ChartQa, dir.path()).unwrap();
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["human_0", "augmented_0", "augmented_1"]
        );
        assert_eq!(
            items[0].question,
            "How many food item is shown in the bar graph?\nAnswer the question using a single word or phrase."
        );
        assert_eq!(
            items[1].image,
            ImageSource::Path(dir.path().join("png/multi_col_1.png"))
        );
        assert_eq!(
            items[1].meta_as::<ChartQaMeta>().unwrap(),
            ChartQaMeta {
                label: "23.5".to_string(),
                split: "augmented".to_string()
            }
        );
        let preds = predictions(&[
            ("human_0", "13"),
            ("augmented_0", "24"),
            ("augmented_1", "japan"),
        ]);
        let score = score(Benchmark::ChartQa, &items, &preds, None).unwrap();
        // 13 vs 14 is 7% off (wrong); 24 vs 23.5 is 2% off (right); japan matches case-insensitively.
        assert_eq!((score.correct, score.total), (2.0, 3));
        assert_eq!(score.extra["human_accuracy"], 0.0);
        assert_eq!(score.extra["augmented_accuracy"], 1.0);
    }

    #[test]
    fn chartqa_missing_split_names_its_file_and_the_parquet_release() {
        let dir = chartqa_dir();
        std::fs::remove_file(dir.path().join("test_augmented.json")).unwrap();
        let message = missing_file_message(Benchmark::ChartQa, dir.path());
        assert!(
            message.contains("test_augmented.json")
                && message.contains("HuggingFaceM4/ChartQA's parquet release")
                && message.contains("data/test-*.parquet"),
            "{message}"
        );
    }

    #[test]
    fn parquet_shards_are_found_in_the_hub_layout_or_flat() {
        let dir = tempfile::tempdir().unwrap();
        assert!(MMBENCH_PARQUET.files(dir.path()).unwrap().is_empty());
        for file in [
            "dev-00000-of-00001.parquet",
            "en/dev-00001-of-00002-b.parquet",
            "en/dev-00000-of-00002-a.parquet",
            "en/test-00000-of-00001.parquet",
            "en/dev.json",
        ] {
            write(dir.path(), file, "");
        }
        // The first folder that has shards wins; in it, name order is the split's row order.
        assert_eq!(
            MMBENCH_PARQUET.files(dir.path()).unwrap(),
            [
                dir.path().join("en/dev-00000-of-00002-a.parquet"),
                dir.path().join("en/dev-00001-of-00002-b.parquet")
            ]
        );
        std::fs::remove_dir_all(dir.path().join("en")).unwrap();
        assert_eq!(
            MMBENCH_PARQUET.files(dir.path()).unwrap(),
            [dir.path().join("dev-00000-of-00001.parquet")]
        );
    }

    #[test]
    fn unreadable_parquet_is_named_unless_the_llava_layout_is_there() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "data/test-00000-of-00001.parquet",
            "<html>not found</html>",
        );
        let error = load(Benchmark::ChartQa, dir.path()).unwrap_err();
        assert!(matches!(error, EvalDataError::Parquet { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("data/test-00000-of-00001.parquet: not a readable parquet file"),
            "{message}"
        );
        let dir = chartqa_dir();
        write(dir.path(), "data/test-00000-of-00001.parquet", "not read");
        assert_eq!(load(Benchmark::ChartQa, dir.path()).unwrap().len(), 3);
    }

    fn mmbench_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit";
        let rows = [
            format!("0\tWhat color is the sky?\tnan\tred\tblue\tgreen\t\tB\tattribute\t{TINY_PNG_BASE64}\tsrc\tl2\tnan\tdev"),
            "1\tWhich one is a fruit?\tLook at the table.\tapple\tstone\tNone\tsand\tA\tobject\t0\tsrc\tl2\tnan\tdev".to_string(),
            "1000000\tWhat color is the sky?\tnan\tblue\tgreen\tred\t\tA\tattribute\t0\tsrc\tl2\tnan\tdev".to_string(),
        ];
        write(
            dir.path(),
            "mmbench_dev_20230712.tsv",
            &format!("{header}\n{}\n", rows.join("\n")),
        );
        dir
    }

    #[test]
    fn mmbench_rows_become_llava_prompts_with_decoded_images() {
        let dir = mmbench_dir();
        let items = load(Benchmark::MmBench, dir.path()).unwrap();
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["0", "1", "1000000"]
        );
        assert_eq!(
            items[0].question,
            "What color is the sky?\nA. red\nB. blue\nC. green\nAnswer with the option's letter from the given choices directly."
        );
        // A hint goes first; options stop at the first missing one ("None"), as in LLaVA's get_options.
        assert_eq!(
            items[1].question,
            "Look at the table.\nWhich one is a fruit?\nA. apple\nB. stone\nAnswer with the option's letter from the given choices directly."
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(TINY_PNG_BASE64)
            .unwrap();
        assert_eq!(items[0].image, ImageSource::Bytes(png.clone()));
        assert_eq!(
            items[1].image,
            ImageSource::Bytes(png),
            "a short image cell refers to another row's image"
        );
        let meta: MmBenchMeta = items[0].meta_as().unwrap();
        assert_eq!(meta.answer.as_deref(), Some("B"));
        assert_eq!(meta.category.as_deref(), Some("attribute"));
    }

    #[test]
    fn mmbench_circular_load_rotates_options_and_answers() {
        let dir = mmbench_dir();
        let options = LoadOptions {
            mmbench_circular: true,
        };
        let items = load_with_options(Benchmark::MmBench, dir.path(), &options).unwrap();
        // Row 0 has 3 options -> 3 rotations; row 1 has 2 -> 2; the file's own copy 1000000 is skipped.
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["0", "1000000", "2000000", "1", "1000001"]);
        let answers: Vec<String> = items
            .iter()
            .map(|i| i.meta_as::<MmBenchMeta>().unwrap().answer.unwrap())
            .collect();
        // "blue" is B; shifted once it is first (A); shifted twice it is last (C).
        assert_eq!(answers, ["B", "A", "C", "A", "B"]);
        assert_eq!(
            items[2].question,
            "What color is the sky?\nA. green\nB. red\nC. blue\nAnswer with the option's letter from the given choices directly."
        );

        // Group 0 has one wrong rotation, group 1 is all right: circular 1/2, plain 4/5.
        let preds = predictions(&[
            ("0", "B"),
            ("1000000", "A"),
            ("2000000", "A"),
            ("1", "A. apple"),
            ("1000001", "B"),
        ]);
        let score = score(Benchmark::MmBench, &items, &preds, None).unwrap();
        assert_eq!((score.correct, score.total, score.accuracy), (1.0, 2, 0.5));
        assert_eq!(score.extra["plain_accuracy"], 0.8);
    }

    #[test]
    fn mmbench_bad_image_reference_and_missing_tsv_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let message = missing_file_message(Benchmark::MmBench, dir.path());
        assert!(
            message.contains("mmbench_dev_20230712.tsv")
                && message.contains("lmms-lab/MMBench's parquet release")
                && message.contains("en/dev-*.parquet"),
            "{message}"
        );
        write(
            dir.path(),
            "mmbench_dev_20230712.tsv",
            "index\tquestion\tA\tB\tanswer\timage\n5\tq\tx\ty\tA\t42\n",
        );
        let error = load(Benchmark::MmBench, dir.path()).unwrap_err();
        assert!(
            error.to_string().contains("neither base64 nor a row index"),
            "{error}"
        );
    }

    enum Column {
        Int64(Vec<i64>),
        /// An optional UTF8 column.
        Text(Vec<Option<&'static str>>),
        Binary(Vec<Vec<u8>>),
    }

    /// A flat parquet file, written with the parquet crate's own writer.
    fn write_parquet(path: &Path, schema: &str, columns: Vec<Column>) {
        use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
        let schema = parquet::schema::parser::parse_message_type(schema).unwrap();
        let file = std::fs::File::create(path).unwrap();
        let mut writer = parquet::file::writer::SerializedFileWriter::new(
            file,
            std::sync::Arc::new(schema),
            Default::default(),
        )
        .unwrap();
        let mut row_group = writer.next_row_group().unwrap();
        for values in columns {
            let mut column = row_group.next_column().unwrap().unwrap();
            match values {
                Column::Int64(values) => {
                    column.typed::<Int64Type>().write_batch(&values, None, None)
                }
                Column::Text(values) => {
                    let levels: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
                    let present: Vec<ByteArray> = values
                        .iter()
                        .flatten()
                        .map(|v| ByteArray::from(*v))
                        .collect();
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&present, Some(&levels), None)
                }
                Column::Binary(values) => {
                    let values: Vec<ByteArray> = values.into_iter().map(ByteArray::from).collect();
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&values, None, None)
                }
            }
            .unwrap();
            column.close().unwrap();
        }
        row_group.close().unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn mmbench_parquet_rows_read_like_tsv_rows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(TINY_PNG_BASE64)
            .unwrap();
        // lmms-lab/MMBench_EN's layout: data/, an int64 index; nulls and "nan" are missing cells.
        write_parquet(
            &dir.path().join("data/dev-00000-of-00001.parquet"),
            "message schema { required int64 index; optional binary question (UTF8); optional binary hint (UTF8);
                optional binary A (UTF8); optional binary B (UTF8); optional binary C (UTF8);
                optional binary answer (UTF8); required binary image; }",
            vec![
                Column::Int64(vec![0, 1]),
                Column::Text(vec![Some("What color is the sky?"), Some("Which one is a fruit?")]),
                Column::Text(vec![None, Some("Look at the table.")]),
                Column::Text(vec![Some("red"), Some("apple")]),
                Column::Text(vec![Some("blue"), Some("stone")]),
                Column::Text(vec![Some("green"), Some("nan")]),
                Column::Text(vec![Some("B"), Some("A")]),
                Column::Binary(vec![png.clone(), png.clone()]),
            ],
        );
        let items = load(Benchmark::MmBench, dir.path()).unwrap();
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["0", "1"]
        );
        assert_eq!(
            items[0].question,
            "What color is the sky?\nA. red\nB. blue\nC. green\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(
            items[1].question,
            "Look at the table.\nWhich one is a fruit?\nA. apple\nB. stone\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(items[1].image, ImageSource::Bytes(png));
        assert_eq!(
            items[0].meta_as::<MmBenchMeta>().unwrap().answer.as_deref(),
            Some("B")
        );
    }

    #[test]
    fn missing_cells_follow_pandas_and_llava() {
        for cell in ["", "nan", "NaN", "None", "NONE", "NA", "null"] {
            assert!(is_missing_cell(cell), "{cell:?}");
        }
        for cell in ["0", "none of these", "N", "apple"] {
            assert!(!is_missing_cell(cell), "{cell:?}");
        }
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
        write(
            dir.path(),
            "testmini.json",
            &mathvista_problems().to_string(),
        );
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let items = load(Benchmark::MathVista, dir.path()).unwrap();
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["2", "10"]
        );
        assert_eq!(
            items[0].image,
            ImageSource::Path(dir.path().join("images/2.jpg"))
        );
        assert!(
            items[1].question.ends_with("(A) 3/11\n(B) 8/11"),
            "the prompt is the query"
        );
        let meta: MathVistaMeta = items[1].meta_as().unwrap();
        assert_eq!(
            meta.problem.choices.as_deref(),
            Some(&["3/11".to_string(), "8/11".to_string()][..])
        );
        assert_eq!(
            meta.problem.question_type,
            MathVistaQuestionType::MultiChoice
        );

        let preds = predictions(&[("2", "It costs $1.45."), ("10", "A")]);
        let score = score(Benchmark::MathVista, &items, &preds, None).unwrap();
        assert_eq!((score.correct, score.total), (1.0, 2));
    }

    #[test]
    fn mathvista_loads_jsonl_and_extracts_with_the_judge() {
        let dir = tempfile::tempdir().unwrap();
        let Value::Object(problems) = mathvista_problems() else {
            unreachable!()
        };
        write(
            dir.path(),
            "testmini.jsonl",
            &jsonl(&problems.into_iter().map(|(_, p)| p).collect::<Vec<_>>()),
        );
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let items = load(Benchmark::MathVista, dir.path()).unwrap();
        assert_eq!(items.len(), 2);

        // Past the direct checks every response goes to the judge, even one the rules could read.
        let server = StubServer::start(vec![(200, completion("1.45")), (200, completion("B"))]);
        let judge = test_client(&server.url, None);
        let preds = predictions(&[("2", "one dollar and forty-five cents"), ("10", "(B) 8/11")]);
        let score = score(Benchmark::MathVista, &items, &preds, Some(&judge)).unwrap();
        let bodies = server.finish();
        assert_eq!(bodies.len(), 2);
        let sent: Value = serde_json::from_str(&bodies[1]).unwrap();
        assert!(sent["messages"][0]["content"]
            .as_str()
            .unwrap()
            .ends_with("\nQuestion: What fraction is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n\n(B) 8/11\n\nExtracted answer: "));
        assert_eq!((score.correct, score.total), (2.0, 2));
        assert_eq!(score.extra["llm_extraction_failures"], 0);

        // A choice's own text and a float that parses never reach it (the stub answers nothing).
        let server = StubServer::start(Vec::new());
        let judge = test_client(&server.url, None);
        let preds = predictions(&[("2", "1.450"), ("10", "8/11")]);
        let score = super::score(Benchmark::MathVista, &items, &preds, Some(&judge)).unwrap();
        assert!(server.finish().is_empty());
        assert_eq!((score.correct, score.total), (2.0, 2));
        assert_eq!(score.extra["llm_extraction_failures"], 0);
    }

    #[test]
    fn mathvista_missing_data_mentions_both_forms_and_the_parquet_release() {
        let dir = tempfile::tempdir().unwrap();
        let message = missing_file_message(Benchmark::MathVista, dir.path());
        assert!(
            message.contains("testmini.json") && message.contains("testmini.jsonl"),
            "{message}"
        );
        assert!(
            message.contains("AI4Math/MathVista's parquet release")
                && message.contains("data/testmini-*.parquet"),
            "{message}"
        );
    }

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
            &jsonl(&[
                json!({ "id": "001", "image": "001.jpg", "caption": ["Diamond Head.", "Waikiki beach."] }),
            ]),
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
        let items = load(Benchmark::LlavaBench, dir.path()).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].question, "What is the name of this famous sight?");
        assert_eq!(
            items[0].image,
            ImageSource::Path(dir.path().join("images/001.jpg"))
        );
        assert_eq!(
            items[1].meta_as::<LlavaBenchMeta>().unwrap(),
            LlavaBenchMeta {
                category: "detail".to_string(),
                context: "Diamond Head.\nWaikiki beach.".to_string(),
                reference_answer: "A crater above a beach.".to_string(),
            }
        );
        std::fs::remove_file(dir.path().join("answers_gpt4.jsonl")).unwrap();
        let message = missing_file_message(Benchmark::LlavaBench, dir.path());
        assert!(
            message.contains("answers_gpt4.jsonl") && message.contains("llava-bench-in-the-wild"),
            "{message}"
        );
    }

    #[test]
    fn llava_bench_rejects_categories_without_a_review_rule() {
        let dir = llava_bench_dir();
        write(
            dir.path(),
            "questions.jsonl",
            &jsonl(&[
                json!({ "question_id": 0, "image": "001.jpg", "text": "Q", "category": "ocr" }),
            ]),
        );
        let error = load(Benchmark::LlavaBench, dir.path()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("category \"ocr\" has no review rule"),
            "{error}"
        );
    }

    #[test]
    fn llava_bench_scoring_uses_judge_reviews() {
        let dir = llava_bench_dir();
        let items = load(Benchmark::LlavaBench, dir.path()).unwrap();
        let server = StubServer::start(vec![
            (200, completion("8 6\nfine")),
            (200, completion("no scores here")),
        ]);
        let judge = test_client(&server.url, None);
        let preds = predictions(&[("0", "Diamond Head"), ("1", "A beach.")]);
        let score = score(Benchmark::LlavaBench, &items, &preds, Some(&judge)).unwrap();
        let bodies = server.finish();
        assert!(bodies[0].contains("[Assistant 2]\\nDiamond Head\\n"));
        // Second review unparsable -> [-1, -1]; all: means 3.5 and 2.5 -> 71.4%.
        assert!((score.accuracy - 0.714).abs() < 1e-9, "{}", score.accuracy);
        assert_eq!(score.extra["categories"]["conv"]["relative"], 75.0);
        assert_eq!(judge.stats().unparsable_scores, 1);
        let error = super::score(Benchmark::LlavaBench, &items, &preds, None).unwrap_err();
        assert!(matches!(
            error,
            ScoreError::JudgeRequired(Benchmark::LlavaBench)
        ));
    }

    #[test]
    fn mm_vet_loads_in_file_order_and_scores_with_the_judge() {
        let dir = tempfile::tempdir().unwrap();
        let records = json!({
            "v1_10": { "imagename": "v1_10.png", "capability": ["ocr"], "question": "What is written?", "answer": "STOP" },
            "v1_2": { "imagename": "v1_2.jpg", "capability": ["math", "ocr"], "question": "What is x?", "answer": "-1<AND>-5" }
        });
        write(dir.path(), "mm-vet.json", &records.to_string());
        let message = missing_file_message(Benchmark::MmVet, dir.path());
        assert!(
            message.contains("images") && message.contains("mm-vet.zip"),
            "{message}"
        );
        std::fs::create_dir_all(dir.path().join("images")).unwrap();

        let items = load(Benchmark::MmVet, dir.path()).unwrap();
        // The official grader iterates (and sums) in the file's order.
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["v1_10", "v1_2"]
        );
        assert_eq!(items[1].question, "What is x?");
        assert_eq!(
            items[0].image,
            ImageSource::Path(dir.path().join("images/v1_10.png"))
        );
        assert_eq!(
            items[1].meta_as::<MmVetMeta>().unwrap().capabilities,
            ["math", "ocr"]
        );

        let server = StubServer::start(vec![(200, completion("0.5")), (200, completion("1.0"))]);
        let judge = test_client(&server.url, None);
        let score = score(
            Benchmark::MmVet,
            &items,
            &predictions(&[("v1_2", "x = -1"), ("v1_10", "STOP")]),
            Some(&judge),
        )
        .unwrap();
        let bodies = server.finish();
        assert!(bodies[0].contains("What is written? | STOP | STOP | "));
        assert!(bodies[1].contains("What is x? | -1 <AND> -5 | x = -1 | "));
        // v1_10 (ocr) 0.5, v1_2 (math, ocr) 1.0.
        assert_eq!((score.correct, score.accuracy), (1.5, 0.75));
        assert_eq!(score.extra["by_capability_percent"]["ocr"], 75.0);
        assert_eq!(score.extra["by_capability_percent"]["math"], 100.0);
    }

    #[test]
    fn invalid_meta_is_reported_with_the_item() {
        let item = EvalItem {
            id: "x".to_string(),
            image: ImageSource::None,
            question: "q".to_string(),
            meta: json!({}),
        };
        let error = score(
            Benchmark::ChartQa,
            &[item],
            &predictions(&[("x", "1")]),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(error, ScoreError::InvalidMeta { ref id, .. } if id == "x"),
            "{error}"
        );
    }
}
