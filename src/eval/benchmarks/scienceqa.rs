//! ScienceQA-IMG (test split): LLaVA-1.5's `llava_test_CQM-A.json` with ScienceQA's images and, when present,
//! `problems.json`; or the `derek-thomas/ScienceQA` parquet release. Scored as `eval_science_qa.py` does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    count_correct, Answer, Benchmark, LoadOptions, MissingPrediction, Score, ScoreError, ANSWER_WITH_OPTION_LETTER,
    OPTION_LETTERS,
};
use crate::eval::files::{invalid, json_text, read_json, require, to_meta, EvalDataError};
use crate::eval::hub_parquet::{ImageColumn, ParquetRelease};
use crate::eval::item::{EvalItem, ImageSource};
use crate::eval::judge::JudgeClient;
use crate::eval::python;

const NAME: &str = "scienceqa";

pub struct ScienceQa;

impl Benchmark for ScienceQa {
    fn name(&self) -> &'static str {
        NAME
    }

    fn load(&self, data_dir: &Path, options: &LoadOptions) -> Result<Vec<EvalItem>, EvalDataError> {
        load_scienceqa(data_dir, options.with_text_only)
    }

    /// `eval_science_qa.py` answers a question without a prediction with the text `FAILED` (wrong) and the
    /// prompt `Unknown`, which has no `<image>`: it counts in Accuracy, not in IMG-Accuracy.
    fn missing_prediction(&self) -> MissingPrediction {
        MissingPrediction::StandIn { text: "FAILED", with_image: false }
    }

    /// `eval_science_qa.py`'s Accuracy (over the items) and IMG-Accuracy (over those with an image): the same
    /// unless the text-only questions are answered too.
    fn score(&self, answers: &[Answer], _judge: Option<&JudgeClient>) -> Result<Score, ScoreError> {
        let with_image: Vec<&Answer> = answers.iter().filter(|a| a.item.image != ImageSource::None).collect();
        let score = count_correct(NAME, answers, |meta: ScienceQaMeta, prediction| {
            Ok(f64::from(u8::from(scienceqa_is_correct(prediction, meta.answer_index, meta.num_choices))))
        })?;
        let mut img_correct = 0usize;
        for answer in &with_image {
            let meta: ScienceQaMeta = answer.meta(NAME)?;
            img_correct += usize::from(scienceqa_is_correct(answer.prediction, meta.answer_index, meta.num_choices));
        }
        let img = Score::new("img", img_correct as f64, with_image.len());
        Ok(score
            .with_extra("img_accuracy", img.accuracy)
            .with_extra("img_correct", img_correct)
            .with_extra("img_total", with_image.len()))
    }
}

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

fn scienceqa_item(id: String, image: ImageSource, human_turn: &str, meta: ScienceQaMeta) -> EvalItem {
    EvalItem {
        id,
        image,
        question: format!("{}\n{ANSWER_WITH_OPTION_LETTER}", python::strip(&human_turn.replace("<image>", ""))),
        meta: to_meta(meta),
    }
}

/// The questions with an image (LLaVA's ScienceQA-IMG), and with `with_text_only` the others too, as
/// `model_vqa_science.py` answers every question of the file (their prompt has no `<image>`).
fn load_scienceqa(data_dir: &Path, with_text_only: bool) -> Result<Vec<EvalItem>, EvalDataError> {
    const LAYOUT_FILE: &str = "llava_test_CQM-A.json";
    if let Some(files) = SCIENCEQA_PARQUET.instead_of(data_dir, &[LAYOUT_FILE])? {
        return load_scienceqa_parquet(&files, with_text_only);
    }
    let questions_path = require(
        NAME,
        data_dir.join(LAYOUT_FILE),
        &format!(
            "it comes with LLaVA's evaluation bundle (eval.zip, playground/data/eval/scienceqa); {}",
            SCIENCEQA_PARQUET.describe()
        ),
    )?;
    let images_dir = require(
        NAME,
        data_dir.join("images").join("test"),
        "unpack the ScienceQA test images (test.zip of the ScienceQA release) there as <id>/image.png",
    )?;
    let problems_path = data_dir.join("problems.json");
    let problems: Option<HashMap<String, ScienceQaProblem>> =
        if problems_path.exists() { Some(read_json(&problems_path)?) } else { None };
    let records: Vec<LlavaConversationRecord> = read_json(&questions_path)?;
    let mut items = Vec::new();
    for record in records {
        let image = match record.image {
            Some(image) => ImageSource::Path(images_dir.join(image)),
            None if with_text_only => ImageSource::None,
            None => continue,
        };
        let id = json_text(&record.id);
        let human_turn = record
            .conversations
            .iter()
            .find(|turn| turn.from == "human")
            .ok_or_else(|| invalid(&questions_path, format!("question {id} has no human turn")))?;
        let meta = match problems.as_ref().and_then(|p| p.get(&id)) {
            Some(problem) => ScienceQaMeta { answer_index: problem.answer, num_choices: problem.choices.len() },
            None => scienceqa_meta_from_answer_turn(&record.conversations).ok_or_else(|| {
                invalid(
                    &questions_path,
                    format!("question {id}: no answer letter in its gpt turn and not in {}", problems_path.display()),
                )
            })?,
        };
        items.push(scienceqa_item(id, image, &human_turn.value, meta));
    }
    Ok(items)
}

/// The same selection as from the LLaVA layout; the release has no problem ids, so items are named by their
/// row in the split.
fn load_scienceqa_parquet(files: &[PathBuf], with_text_only: bool) -> Result<Vec<EvalItem>, EvalDataError> {
    let items = SCIENCEQA_PARQUET.read_records(files, |row, problem: ScienceQaRow, image| {
        Ok((with_text_only || image != ImageSource::None).then(|| {
            let meta =
                ScienceQaMeta { answer_index: problem.problem.answer, num_choices: problem.problem.choices.len() };
            scienceqa_item(row.to_string(), image, &scienceqa_human_turn(&problem), meta)
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

/// The option letters `eval_science_qa.py` accepts (its `--options` default).
pub const SCIENCEQA_OPTION_LETTERS: [char; 5] = ['A', 'B', 'C', 'D', 'E'];

static SCIENCEQA_ANSWER_SENTENCE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"The answer is ([A-Z]).").expect("valid regex"));

/// The letter `eval_science_qa.py` reads from a prediction: the bare letter,
/// a leading `"X. "`, or the letter of exactly one `The answer is X.` sentence.
/// The prediction is not trimmed, as in the official script.
pub fn parse_scienceqa_letter(prediction: &str) -> Option<char> {
    let chars: Vec<char> = prediction.chars().collect();
    if let [letter] = chars[..] {
        return SCIENCEQA_OPTION_LETTERS.contains(&letter).then_some(letter);
    }
    if chars.len() >= 3 && SCIENCEQA_OPTION_LETTERS.contains(&chars[0]) && chars[1] == '.' && chars[2] == ' ' {
        return Some(chars[0]);
    }
    let mut sentences = SCIENCEQA_ANSWER_SENTENCE.captures_iter(prediction);
    match (sentences.next(), sentences.next()) {
        (Some(only), None) => only[1].chars().next(),
        _ => None,
    }
}

/// `get_pred_idx`: the chosen option's index, if the letter names one of the `num_choices` options.
pub fn scienceqa_prediction_index(prediction: &str, num_choices: usize) -> Option<usize> {
    let letter = parse_scienceqa_letter(prediction)?;
    SCIENCEQA_OPTION_LETTERS[..num_choices.min(SCIENCEQA_OPTION_LETTERS.len())].iter().position(|&l| l == letter)
}

/// Unparsable predictions count as wrong, as in the official script.
pub fn scienceqa_is_correct(prediction: &str, answer_index: usize, num_choices: usize) -> bool {
    scienceqa_prediction_index(prediction, num_choices) == Some(answer_index)
}

#[cfg(test)]
mod tests {
    use super::super::score;
    use super::super::test_support::{load, missing_file_message, predictions, write};
    use super::*;
    use serde_json::json;

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
        let items = load(&ScienceQa, dir.path()).unwrap();
        assert_eq!(items.len(), 2, "the text-only question is skipped");
        assert_eq!(items[0].id, "4");
        assert_eq!(items[0].image, ImageSource::Path(dir.path().join("images/test/4/image.png")));
        assert_eq!(
            items[0].question,
            "Context: Select the best answer.\nWhich property do these three objects have in common?\nA. shiny\nB. slippery\nC. opaque\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(items[0].meta_as::<ScienceQaMeta>().unwrap(), ScienceQaMeta { answer_index: 2, num_choices: 5 });
        assert_eq!(
            items[1].question,
            "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) whale\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(items[1].meta_as::<ScienceQaMeta>().unwrap().answer_index, 1);
    }

    #[test]
    fn scienceqa_text_only_questions_are_answered_on_request_and_scored_apart() {
        let dir = scienceqa_dir();
        let all = ScienceQa.load(dir.path(), &LoadOptions { with_text_only: true, ..LoadOptions::default() }).unwrap();
        assert_eq!(all.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["4", "5", "7"]);
        assert_eq!(all[1].image, ImageSource::None);
        assert_eq!(
            all[1].question,
            "Which word comes first?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
        );
        // eval_science_qa.py: Accuracy over all, IMG-Accuracy over the questions with an image.
        let score = score(&ScienceQa, &all, &predictions(&[("4", "C"), ("5", "A"), ("7", "A")]), None).unwrap();
        assert_eq!((score.correct, score.total), (2.0, 3));
        assert_eq!((score.extra["img_correct"].as_u64(), score.extra["img_total"].as_u64()), (Some(1), Some(2)));
        assert_eq!(score.extra["img_accuracy"], 0.5);
    }

    #[test]
    fn scienceqa_prefers_problems_json_answers() {
        let dir = scienceqa_dir();
        let problems = json!({
            "4": { "choices": ["shiny", "slippery", "opaque"], "answer": 2, "image": "image.png" },
            "7": { "choices": ["frog", "whale"], "answer": 1, "image": "image.png" }
        });
        write(dir.path(), "problems.json", &problems.to_string());
        let items = load(&ScienceQa, dir.path()).unwrap();
        assert_eq!(items[0].meta_as::<ScienceQaMeta>().unwrap(), ScienceQaMeta { answer_index: 2, num_choices: 3 });
        assert_eq!(items[1].meta_as::<ScienceQaMeta>().unwrap(), ScienceQaMeta { answer_index: 1, num_choices: 2 });
    }

    #[test]
    fn scienceqa_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let message = missing_file_message(&ScienceQa, dir.path());
        assert!(
            message.contains("llava_test_CQM-A.json")
                && message.contains("eval.zip")
                && message.contains("derek-thomas/ScienceQA's parquet release")
                && message.contains("data/test-*.parquet or test-*.parquet"),
            "{message}"
        );
        write(dir.path(), "llava_test_CQM-A.json", "[]");
        let message = missing_file_message(&ScienceQa, dir.path());
        assert!(message.contains("images/test") && message.contains("test.zip"), "{message}");
    }

    #[test]
    fn scienceqa_parquet_rows_rebuild_the_llava_human_turn() {
        let row = |hint: Option<&str>| ScienceQaRow {
            question: "Which animal is shown?".to_string(),
            hint: hint.map(str::to_string),
            problem: ScienceQaProblem { choices: vec!["dog".to_string(), "cat".to_string()], answer: 1 },
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
        let items = load(&ScienceQa, dir.path()).unwrap();
        let score = score(&ScienceQa, &items, &predictions(&[("4", "C"), ("7", "A")]), None).unwrap();
        assert_eq!((score.correct, score.total, score.accuracy), (1.0, 2, 0.5));
        // The prediction is read as it is, as eval_science_qa.py reads the answer file: "C\n" is no answer.
        let raw = predictions(&[("4", "C\n"), ("7", "B")]);
        assert_eq!(super::super::score(&ScienceQa, &items, &raw, None).unwrap().correct, 1.0);
    }

    #[test]
    fn scienceqa_missing_prediction_is_wrong_as_in_eval_science_qa() {
        // eval_science_qa.py grades a missing question as the text FAILED with the prompt "Unknown": wrong in
        // Accuracy, and no `<image>` in that prompt, so not in IMG-Accuracy.
        let dir = scienceqa_dir();
        let items = load(&ScienceQa, dir.path()).unwrap();
        let score = score(&ScienceQa, &items, &predictions(&[("4", "C")]), None).unwrap();
        assert_eq!((score.correct, score.total, score.missing_predictions), (1.0, 2, 1));
        assert_eq!(score.accuracy, 0.5);
        assert_eq!((score.extra["img_accuracy"].as_f64(), score.extra["img_total"].as_u64()), (Some(1.0), Some(1)));
        let json = serde_json::to_value(&score).unwrap();
        assert_eq!(json["missing_predictions"], 1);
    }

    #[test]
    fn scienceqa_letter_parsing_follows_eval_science_qa() {
        assert_eq!(parse_scienceqa_letter("B"), Some('B'));
        assert_eq!(parse_scienceqa_letter("C. opaque"), Some('C'));
        assert_eq!(parse_scienceqa_letter("The answer is D."), Some('D'));
        // The regex allows any capital; the index check rejects it later.
        assert_eq!(parse_scienceqa_letter("Answer: The answer is F."), Some('F'));
        // Two sentences are ambiguous, a lowercase letter or a missing trailing character never match.
        assert_eq!(parse_scienceqa_letter("The answer is A. The answer is B."), None);
        assert_eq!(parse_scienceqa_letter("the answer is a."), None);
        assert_eq!(parse_scienceqa_letter("The answer is A"), None);
        // No trimming: a trailing space breaks the bare-letter form.
        assert_eq!(parse_scienceqa_letter("A "), None);
        assert_eq!(parse_scienceqa_letter("F"), None);
    }

    #[test]
    fn scienceqa_index_and_correctness() {
        assert_eq!(scienceqa_prediction_index("C", 3), Some(2));
        assert_eq!(scienceqa_prediction_index("D", 3), None); // only A-C exist
        assert_eq!(scienceqa_prediction_index("The answer is F.", 5), None);
        assert!(scienceqa_is_correct("B. slippery", 1, 3));
        assert!(!scienceqa_is_correct("A", 1, 3));
        assert!(!scienceqa_is_correct("I am not sure", 0, 2));
    }
}
