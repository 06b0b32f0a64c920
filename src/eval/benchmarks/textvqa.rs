//! TextVQA (validation): LLaVA-1.5's `llava_textvqa_val_v051_ocr.jsonl` joined with the TextVQA 0.5.1
//! annotations as `eval_textvqa.py` joins them, scored with the EvalAI answer processor and VQA accuracy of
//! TextVQA's `m4c_evaluator.py`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{count_correct, Answer, Benchmark, LlavaAnswerIndex, LoadOptions, MissingPrediction, Score, ScoreError};
use crate::eval::files::{invalid, json_text, read_json, read_jsonl, require, to_meta, EvalDataError};
use crate::eval::item::{EvalItem, ImageSource};
use crate::eval::judge::JudgeClient;
use crate::eval::python;

const NAME: &str = "textvqa";

pub struct TextVqa;

impl Benchmark for TextVqa {
    fn name(&self) -> &'static str {
        NAME
    }

    fn load(&self, data_dir: &Path, _options: &LoadOptions) -> Result<Vec<EvalItem>, EvalDataError> {
        load_textvqa(data_dir)
    }

    /// `eval_textvqa.py` scores the lines of the answer file: an unanswered question is not in its denominator.
    fn missing_prediction(&self) -> MissingPrediction {
        MissingPrediction::LeftOut
    }

    fn score(&self, answers: &[Answer], _judge: Option<&JudgeClient>) -> Result<Score, ScoreError> {
        count_correct(NAME, answers, |meta: TextVqaMeta, prediction| Ok(vqa_accuracy(prediction, &meta.answers)))
    }

    /// LLaVA's TextVQA answers carry the image id as `question_id`; like `eval_textvqa.py`, they are matched on
    /// it and the question in their `prompt`.
    fn llava_answer_index(&self, items: &[EvalItem]) -> Option<Box<dyn LlavaAnswerIndex>> {
        Some(Box::new(TextVqaAnswerIndex::new(items)))
    }
}

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
    let questions_path = require(
        NAME,
        data_dir.join("llava_textvqa_val_v051_ocr.jsonl"),
        "it comes with LLaVA's evaluation bundle (eval.zip, playground/data/eval/textvqa)",
    )?;
    let annotations_path = require(
        NAME,
        data_dir.join("TextVQA_0.5.1_val.json"),
        "download the TextVQA v0.5.1 validation annotations from the TextVQA project",
    )?;
    let images_dir = require(
        NAME,
        data_dir.join("train_images"),
        "unpack TextVQA's train_val_images.zip there (validation images live in train_images)",
    )?;
    let annotations: TextVqaAnnotations = read_json(&annotations_path)?;
    // `eval_textvqa.py` joins on (image id, lowercased question); LLaVA's
    // question_id field holds the image id.
    let by_image_and_question: HashMap<(String, String), TextVqaAnnotation> =
        annotations.data.into_iter().map(|a| ((a.image_id.clone(), a.question.to_lowercase()), a)).collect();
    // Lines that share that key are answered and scored each on its own, as `eval_textvqa.py` scores every answer
    // line (all against the key's last annotation); the second of them is item `<question id>#2`, and so on.
    let mut repeats: HashMap<(String, String), usize> = HashMap::new();
    read_jsonl::<LlavaQuestionLine>(&questions_path)?
        .into_iter()
        .map(|line| {
            let image_id = json_text(&line.question_id);
            let question = textvqa_question_from_prompt(&line.text)
                .ok_or_else(|| invalid(&questions_path, format!("unrecognised prompt layout: {:?}", line.text)))?;
            let annotation = by_image_and_question.get(&(image_id.clone(), question.clone())).ok_or_else(|| {
                invalid(&annotations_path, format!("no annotation for image {image_id}, question {question:?}"))
            })?;
            let repeat = repeats.entry((image_id.clone(), question)).or_default();
            *repeat += 1;
            Ok(EvalItem {
                id: repeated_id(&json_text(&annotation.question_id), *repeat),
                image: ImageSource::Path(images_dir.join(&line.image)),
                question: line.text,
                meta: to_meta(TextVqaMeta { answers: annotation.answers.clone(), image_id }),
            })
        })
        .collect()
}

/// The id of the `repeat`-th question line (from 1) with one image and question.
fn repeated_id(question_id: &str, repeat: usize) -> String {
    if repeat == 1 {
        question_id.to_string()
    } else {
        format!("{question_id}#{repeat}")
    }
}

/// Item ids by the key `eval_textvqa.py` joins LLaVA's answer lines on: the
/// image id (their `question_id`) and the lowercased question of the prompt.
/// The n-th answer line with a key is the n-th item with it.
struct TextVqaAnswerIndex {
    items: HashMap<(String, String), Vec<String>>,
    seen: HashMap<(String, String), usize>,
}

impl TextVqaAnswerIndex {
    fn new(items: &[EvalItem]) -> Self {
        let mut by_key: HashMap<(String, String), Vec<String>> = HashMap::new();
        for item in items {
            let (Ok(meta), Some(question)) =
                (item.meta_as::<TextVqaMeta>(), textvqa_question_from_prompt(&item.question))
            else {
                continue;
            };
            by_key.entry((meta.image_id, question)).or_default().push(item.id.clone());
        }
        TextVqaAnswerIndex { items: by_key, seen: HashMap::new() }
    }
}

impl LlavaAnswerIndex for TextVqaAnswerIndex {
    /// `Err` when the prompt has a layout `prompt_processor` cannot read (the official script fails there too).
    fn item_id(&mut self, image_id: &str, prompt: &str) -> Result<Option<String>, String> {
        let question = textvqa_question_from_prompt(prompt)
            .ok_or_else(|| format!("unrecognised TextVQA prompt layout: {prompt:?}"))?;
        let key = (image_id.to_string(), question);
        let seen = self.seen.entry(key.clone()).or_default();
        *seen += 1;
        Ok(self.items.get(&key).and_then(|ids| ids.get(*seen - 1)).cloned())
    }
}

#[rustfmt::skip]
const VQA_CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"), ("arent", "aren't"), ("cant", "can't"), ("couldve", "could've"),
    ("couldnt", "couldn't"), ("couldn'tve", "couldn't've"), ("couldnt've", "couldn't've"),
    ("didnt", "didn't"), ("doesnt", "doesn't"), ("dont", "don't"), ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"), ("hadn'tve", "hadn't've"), ("hasnt", "hasn't"), ("havent", "haven't"),
    ("hed", "he'd"), ("hed've", "he'd've"), ("he'dve", "he'd've"), ("hes", "he's"), ("howd", "how'd"),
    ("howll", "how'll"), ("hows", "how's"), ("Id've", "I'd've"), ("I'dve", "I'd've"), ("Im", "I'm"),
    ("Ive", "I've"), ("isnt", "isn't"), ("itd", "it'd"), ("itd've", "it'd've"), ("it'dve", "it'd've"),
    ("itll", "it'll"), ("let's", "let's"), ("maam", "ma'am"), ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"), ("mightn'tve", "mightn't've"), ("mightve", "might've"),
    ("mustnt", "mustn't"), ("mustve", "must've"), ("neednt", "needn't"), ("notve", "not've"),
    ("oclock", "o'clock"), ("oughtnt", "oughtn't"), ("ow's'at", "'ow's'at"), ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"), ("shant", "shan't"), ("shed've", "she'd've"), ("she'dve", "she'd've"),
    ("she's", "she's"), ("shouldve", "should've"), ("shouldnt", "shouldn't"), ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"), ("somebody'd", "somebodyd"), ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"), ("somebodyll", "somebody'll"), ("somebodys", "somebody's"),
    ("someoned", "someone'd"), ("someoned've", "someone'd've"), ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"), ("someones", "someone's"), ("somethingd", "something'd"),
    ("somethingd've", "something'd've"), ("something'dve", "something'd've"), ("somethingll", "something'll"),
    ("thats", "that's"), ("thered", "there'd"), ("thered've", "there'd've"), ("there'dve", "there'd've"),
    ("therere", "there're"), ("theres", "there's"), ("theyd", "they'd"), ("theyd've", "they'd've"),
    ("they'dve", "they'd've"), ("theyll", "they'll"), ("theyre", "they're"), ("theyve", "they've"),
    ("twas", "'twas"), ("wasnt", "wasn't"), ("wed've", "we'd've"), ("we'dve", "we'd've"), ("weve", "we've"),
    ("werent", "weren't"), ("whatll", "what'll"), ("whatre", "what're"), ("whats", "what's"),
    ("whatve", "what've"), ("whens", "when's"), ("whered", "where'd"), ("wheres", "where's"),
    ("whereve", "where've"), ("whod", "who'd"), ("whod've", "who'd've"), ("who'dve", "who'd've"),
    ("wholl", "who'll"), ("whos", "who's"), ("whove", "who've"), ("whyll", "why'll"), ("whyre", "why're"),
    ("whys", "why's"), ("wont", "won't"), ("wouldve", "would've"), ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"), ("wouldn'tve", "wouldn't've"), ("yall", "y'all"), ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"), ("yall'd've", "y'all'd've"), ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"), ("youd", "you'd"), ("youd've", "you'd've"), ("you'dve", "you'd've"),
    ("youll", "you'll"), ("youre", "you're"), ("youve", "you've"),
];

#[rustfmt::skip]
const VQA_NUMBER_WORDS: &[(&str, &str)] = &[
    ("none", "0"), ("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5"),
    ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10"),
];

const VQA_ARTICLES: [&str; 3] = ["a", "an", "the"];

const VQA_PUNCTUATION: [char; 21] =
    [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!'];

/// The official `PERIOD_STRIP.sub("", text, re.UNICODE)` passes `re.UNICODE`
/// (32) as the `count` argument, so at most 32 periods are removed.
const VQA_MAX_PERIODS_STRIPPED: usize = 32;

/// The EvalAI answer processor used by TextVQA's `m4c_evaluator.py`, applied
/// to both predictions and ground-truth answers.
pub fn normalize_vqa_answer(answer: &str) -> String {
    let tokenized = answer.to_lowercase().replace([',', '?'], "").replace("'s", " 's");
    let single_line = python::strip(&tokenized).replace(['\n', '\t'], " ");
    let without_punctuation = process_vqa_punctuation(python::strip(&single_line));
    process_vqa_digits_and_articles(&without_punctuation)
}

/// `process_punctuation`: a punctuation mark is deleted when it touches a
/// space or when the text has a comma between digits (`100,978` → `100978`),
/// otherwise replaced by a space; then periods not followed by a digit go.
pub fn process_vqa_punctuation(text: &str) -> String {
    let delete_all = has_comma_between_digits(text);
    let mut out = text.to_string();
    for mark in VQA_PUNCTUATION {
        let touches_space = text.contains(&format!("{mark} ")) || text.contains(&format!(" {mark}"));
        out = out.replace(mark, if touches_space || delete_all { "" } else { " " });
    }
    strip_non_decimal_periods(&out)
}

fn has_comma_between_digits(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    chars.iter().enumerate().any(|(i, c)| {
        if !python::is_decimal(*c) || chars.get(i + 1) != Some(&',') {
            return false;
        }
        let after_commas = chars[i + 1..].iter().find(|&&c| c != ',');
        after_commas.is_some_and(|&c| python::is_decimal(c))
    })
}

fn strip_non_decimal_periods(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut removed = 0;
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        let followed_by_digit = chars.get(i + 1).is_some_and(|&n| python::is_decimal(n));
        if c == '.' && !followed_by_digit && removed < VQA_MAX_PERIODS_STRIPPED {
            removed += 1;
        } else {
            out.push(c);
        }
    }
    out
}

fn process_vqa_digits_and_articles(text: &str) -> String {
    let lookup =
        |table: &[(&str, &'static str)], word: &str| table.iter().find(|(from, _)| *from == word).map(|(_, to)| *to);
    python::split(&text.to_lowercase())
        .map(|word| lookup(VQA_NUMBER_WORDS, word).unwrap_or(word))
        .filter(|word| !VQA_ARTICLES.contains(word))
        .map(|word| lookup(VQA_CONTRACTIONS, word).unwrap_or(word).to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// VQA accuracy of one prediction: the mean over the "leave one annotator
/// out" subsets of `min(#matching answers / 3, 1)`, after normalisation.
pub fn vqa_accuracy(prediction: &str, ground_truth_answers: &[String]) -> f64 {
    if ground_truth_answers.is_empty() {
        return 0.0;
    }
    let prediction = normalize_vqa_answer(prediction);
    let matches: Vec<bool> = ground_truth_answers.iter().map(|a| normalize_vqa_answer(a) == prediction).collect();
    let total_matches = matches.iter().filter(|&&m| m).count();
    let subset_scores: f64 = matches
        .iter()
        .map(|&left_out_matches| {
            let others = total_matches - usize::from(left_out_matches);
            (others as f64 / 3.0).min(1.0)
        })
        .sum();
    subset_scores / ground_truth_answers.len() as f64
}

#[cfg(test)]
mod tests {
    use super::super::score;
    use super::super::test_support::{jsonl, load, missing_file_message, predictions, write};
    use super::*;
    use serde_json::json;

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
        write(dir.path(), "TextVQA_0.5.1_val.json", &annotations.to_string());
        std::fs::create_dir_all(dir.path().join("train_images")).unwrap();
        dir
    }

    #[test]
    fn textvqa_joins_questions_with_annotations() {
        let dir = textvqa_dir();
        let items = load(&TextVqa, dir.path()).unwrap();
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["34602", "34603"]);
        assert_eq!(items[0].image, ImageSource::Path(dir.path().join("train_images/003a8ae2ef43b901.jpg")));
        assert!(items[0].question.starts_with("what is the brand of this camera?\nReference OCR token: dakota"));
        let meta: TextVqaMeta = items[0].meta_as().unwrap();
        assert_eq!((meta.answers.len(), meta.image_id.as_str()), (10, "003a8ae2ef43b901"));

        let score = score(&TextVqa, &items, &predictions(&[("34602", "Dakota."), ("34603", "2009")]), None).unwrap();
        // "dakota" matches 9 of 10 answers: every leave-one-out subset keeps >= 3 -> 1.0; "2009" -> 0.
        assert_eq!((score.correct, score.accuracy), (1.0, 0.5));
    }

    #[test]
    fn textvqa_missing_prediction_is_left_out_as_eval_textvqa_leaves_it() {
        let dir = textvqa_dir();
        let items = load(&TextVqa, dir.path()).unwrap();
        let score = score(&TextVqa, &items, &predictions(&[("34602", "Dakota.")]), None).unwrap();
        assert_eq!((score.correct, score.total, score.missing_predictions, score.accuracy), (1.0, 1, 1, 1.0));
    }

    #[test]
    fn textvqa_lines_with_one_image_and_question_are_scored_each_on_its_own() {
        // Two question lines on one image whose questions are equal once lowercased, and two annotations for
        // them: eval_textvqa.py keys its annotations by (image, lowercased question), so the last one (34605)
        // grades both answer lines, each on its own.
        let dir = tempfile::tempdir().unwrap();
        let suffix = "\nAnswer the question using a single word or phrase.";
        write(
            dir.path(),
            "llava_textvqa_val_v051_ocr.jsonl",
            &jsonl(&[
                json!({ "question_id": "img", "image": "img.jpg", "text": format!("What is it?{suffix}") }),
                json!({ "question_id": "img", "image": "img.jpg", "text": format!("what is it?{suffix}") }),
            ]),
        );
        let annotations = json!({ "data": [
            { "question": "What is it?", "image_id": "img", "question_id": 34604, "answers": vec!["cat"; 10] },
            { "question": "what is it?", "image_id": "img", "question_id": 34605, "answers": vec!["dog"; 10] }
        ]});
        write(dir.path(), "TextVQA_0.5.1_val.json", &annotations.to_string());
        std::fs::create_dir_all(dir.path().join("train_images")).unwrap();
        let items = load(&TextVqa, dir.path()).unwrap();
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["34605", "34605#2"]);
        let score = score(&TextVqa, &items, &predictions(&[("34605", "dog"), ("34605#2", "cat")]), None).unwrap();
        assert_eq!((score.correct, score.total), (1.0, 2));

        // LLaVA's answer lines carry the image id: the n-th line with a key is the n-th item with it.
        let mut index = TextVqa.llava_answer_index(&items).unwrap();
        let prompt = format!("WHAT is it?{suffix}");
        assert_eq!(index.item_id("img", &prompt).unwrap().as_deref(), Some("34605"));
        assert_eq!(index.item_id("img", &prompt).unwrap().as_deref(), Some("34605#2"));
        assert_eq!(index.item_id("img", &prompt).unwrap(), None, "a third line has no item");
    }

    #[test]
    fn textvqa_prompt_processor_layouts() {
        let three_lines = "Q?\nReference OCR token: a\nAnswer the question using a single word or phrase.";
        assert_eq!(textvqa_question_from_prompt(three_lines).as_deref(), Some("q?"));
        let ocr_first = "Reference OCR token: a\nWhat Is It?\nAnswer the question using a single word or phrase.";
        assert_eq!(textvqa_question_from_prompt(ocr_first).as_deref(), Some("what is it?"));
        let ocr_tokens = "OCR tokens: a b Question: Who\nwon? Short answer:";
        assert_eq!(textvqa_question_from_prompt(ocr_tokens).as_deref(), Some("who\nwon?"));
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
        let error = load(&TextVqa, dir.path()).unwrap_err();
        assert!(error.to_string().contains("no annotation for image ffff"), "{error}");
        std::fs::remove_file(dir.path().join("TextVQA_0.5.1_val.json")).unwrap();
        let message = missing_file_message(&TextVqa, dir.path());
        assert!(message.contains("TextVQA_0.5.1_val.json"), "{message}");
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn vqa_normalisation_follows_the_evalai_processor() {
        // Lowercase, trailing period removed, number word to digit.
        assert_eq!(normalize_vqa_answer("Two Dogs."), "2 dogs");
        // Articles removed.
        assert_eq!(normalize_vqa_answer("The Cat"), "cat");
        assert_eq!(normalize_vqa_answer("an apple a day"), "apple day");
        // Commas are dropped first, so digit groups join up.
        assert_eq!(normalize_vqa_answer("100,978"), "100978");
        // Decimal points survive.
        assert_eq!(normalize_vqa_answer("3.5"), "3.5");
        // Missing apostrophes restored.
        assert_eq!(normalize_vqa_answer("dont"), "don't");
        assert_eq!(normalize_vqa_answer("Whats up"), "what's up");
        // Punctuation inside a word becomes a space; next to a space it disappears.
        assert_eq!(normalize_vqa_answer("coca-cola"), "coca cola");
        assert_eq!(normalize_vqa_answer("yes - no"), "yes no");
        // "'s" is split off as its own token; "none" counts as zero.
        assert_eq!(normalize_vqa_answer("John's"), "john 's");
        assert_eq!(normalize_vqa_answer("None"), "0");
        assert_eq!(normalize_vqa_answer(" ten\tdollars?\n"), "10 dollars");
        // Colons and apostrophes are kept.
        assert_eq!(normalize_vqa_answer("12:30"), "12:30");
    }

    #[test]
    fn vqa_punctuation_comma_between_digits_deletes_marks_instead_of_spacing() {
        // With a digit comma every mark is deleted (not spaced) and the comma goes too.
        assert_eq!(process_vqa_punctuation("1,000 a/b"), "1000 ab");
        // Without one, a mark inside a word becomes a space.
        assert_eq!(process_vqa_punctuation("a/b"), "a b");
        assert_eq!(process_vqa_punctuation("a,b"), "a b");
    }

    #[test]
    fn vqa_period_stripping_keeps_decimals_and_stops_after_32() {
        assert_eq!(process_vqa_punctuation("v1.5 end."), "v1.5 end");
        assert_eq!(process_vqa_punctuation("1..5"), "1.5");
        let dots = ".".repeat(40);
        assert_eq!(process_vqa_punctuation(&dots), ".".repeat(8));
    }

    #[test]
    fn vqa_accuracy_averages_leave_one_out_subsets() {
        let ten = |matching: usize| {
            let mut answers = vec!["cat".to_string(); matching];
            answers.resize(10, "dog".to_string());
            answers
        };
        // 3 matches: leaving out a match (3 subsets) leaves 2 -> 2/3; leaving out
        // another (7 subsets) leaves 3 -> 1. Mean = (3*2/3 + 7)/10 = 0.9.
        assert!(close(vqa_accuracy("cat", &ten(3)), 0.9));
        // 1 match: 1 subset scores 0, 9 subsets score 1/3 -> 0.3.
        assert!(close(vqa_accuracy("Cat.", &ten(1)), 0.3));
        // 4 or more matches always leave at least 3 -> 1.
        assert!(close(vqa_accuracy("the cat", &ten(4)), 1.0));
        // 2 matches: 2 subsets score 1/3, 8 score 2/3 -> (2/3 + 16/3)/10 = 0.6.
        assert!(close(vqa_accuracy("cat", &ten(2)), 0.6));
        assert_eq!(vqa_accuracy("bird", &ten(5)), 0.0);
        assert_eq!(vqa_accuracy("cat", &[]), 0.0);
    }
}
