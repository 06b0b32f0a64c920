//! Scoring rules of the benchmarks STIC reports, reimplemented to behave like
//! the official evaluation scripts: LLaVA-1.5's `eval_science_qa.py`, the
//! TextVQA `m4c_evaluator.py`, ChartQA relaxed accuracy, MMBench's option
//! matching and circular evaluation, MathVista's `extract_answer.py` and
//! `calculate_score.py`, and the LLaVA-Bench / MM-Vet summaries.
//!
//! Several helpers mimic Python built-ins (`float()`, `int()`, `round()`,
//! `repr(float)`) because the official scores compare the strings those
//! built-ins produce.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One benchmark's result, ready to be written as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub name: String,
    /// Sum of per-item scores: a count for exact-match metrics, a soft sum
    /// for VQA accuracy and MM-Vet grades.
    pub correct: f64,
    pub total: usize,
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
        let accuracy = if total == 0 {
            0.0
        } else {
            correct / total as f64
        };
        Score {
            name: name.into(),
            correct,
            total,
            accuracy,
            extra: Map::new(),
        }
    }

    pub fn with_extra(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }
}

// ---------------------------------------------------------------- Python built-ins

/// Python's `float(text)`: surrounding whitespace allowed, `inf`/`nan`
/// spellings, and `_` only between digits.
pub fn parse_python_float(text: &str) -> Option<f64> {
    without_digit_underscores(text.trim())?.parse().ok()
}

/// Python's `int(text)` for base-10 strings, returned as `str(int(text))`.
pub fn parse_python_int(text: &str) -> Option<String> {
    let digits = without_digit_underscores(text.trim())?;
    let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(&digits);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i128>().ok().map(|n| n.to_string())
}

/// Removes underscores that separate digits; `None` if any other underscore is present.
fn without_digit_underscores(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let separates_digits = |i: usize| {
        i > 0
            && i + 1 < chars.len()
            && chars[i - 1].is_ascii_digit()
            && chars[i + 1].is_ascii_digit()
    };
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        match c {
            '_' if separates_digits(i) => {}
            '_' => return None,
            _ => out.push(c),
        }
    }
    Some(out)
}

/// Python's `round(x, ndigits)` on a float (round-half-even on the exact binary value).
pub fn python_round(x: f64, ndigits: usize) -> f64 {
    // Rust's fixed-precision formatting rounds the exact value half-to-even, as CPython does.
    format!("{x:.ndigits$}").parse().unwrap_or(x)
}

/// NumPy's `round(np.float64(x), decimals)`: `rint(x * 10**decimals) / 10**decimals`.
/// Unlike Python's `round` it rounds the scaled product, e.g. 0.35 -> 0.4 where Python gives 0.3.
pub fn numpy_round(x: f64, decimals: u32) -> f64 {
    let scale = 10f64.powi(decimals as i32);
    (x * scale).round_ties_even() / scale
}

/// Python's `repr(x)` / `str(x)` for a float: shortest round-trip digits,
/// always a decimal point, scientific notation outside `1e-4 <= |x| < 1e16`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("`{:e}` always writes an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` writes an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        if exponent >= 0 {
            let int_len = exponent as usize + 1;
            let padded = format!("{digits:0<int_len$}");
            let (int_part, frac_part) = padded.split_at(int_len);
            let frac_part = if frac_part.is_empty() { "0" } else { frac_part };
            format!("{sign}{int_part}.{frac_part}")
        } else {
            let zeros = "0".repeat((-exponent - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs())
    }
}

// ---------------------------------------------------------------- ScienceQA

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
    if chars.len() >= 3
        && SCIENCEQA_OPTION_LETTERS.contains(&chars[0])
        && chars[1] == '.'
        && chars[2] == ' '
    {
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
    SCIENCEQA_OPTION_LETTERS[..num_choices.min(SCIENCEQA_OPTION_LETTERS.len())]
        .iter()
        .position(|&l| l == letter)
}

/// Unparsable predictions count as wrong, as in the official script.
pub fn scienceqa_is_correct(prediction: &str, answer_index: usize, num_choices: usize) -> bool {
    scienceqa_prediction_index(prediction, num_choices) == Some(answer_index)
}

// ---------------------------------------------------------------- VQA / TextVQA

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

const VQA_PUNCTUATION: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// The official `PERIOD_STRIP.sub("", text, re.UNICODE)` passes `re.UNICODE`
/// (32) as the `count` argument, so at most 32 periods are removed.
const VQA_MAX_PERIODS_STRIPPED: usize = 32;

/// The EvalAI answer processor used by TextVQA's `m4c_evaluator.py`, applied
/// to both predictions and ground-truth answers.
pub fn normalize_vqa_answer(answer: &str) -> String {
    let tokenized = answer
        .to_lowercase()
        .replace([',', '?'], "")
        .replace("'s", " 's");
    let single_line = tokenized.trim().replace(['\n', '\t'], " ");
    let without_punctuation = process_vqa_punctuation(single_line.trim());
    process_vqa_digits_and_articles(&without_punctuation)
}

/// `process_punctuation`: a punctuation mark is deleted when it touches a
/// space or when the text has a comma between digits (`100,978` → `100978`),
/// otherwise replaced by a space; then periods not followed by a digit go.
pub fn process_vqa_punctuation(text: &str) -> String {
    let delete_all = has_comma_between_digits(text);
    let mut out = text.to_string();
    for mark in VQA_PUNCTUATION {
        let touches_space =
            text.contains(&format!("{mark} ")) || text.contains(&format!(" {mark}"));
        out = out.replace(mark, if touches_space || delete_all { "" } else { " " });
    }
    strip_non_decimal_periods(&out)
}

fn has_comma_between_digits(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    chars.iter().enumerate().any(|(i, c)| {
        if !c.is_ascii_digit() || chars.get(i + 1) != Some(&',') {
            return false;
        }
        let after_commas = chars[i + 1..].iter().find(|&&c| c != ',');
        after_commas.is_some_and(|c| c.is_ascii_digit())
    })
}

fn strip_non_decimal_periods(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut removed = 0;
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        let followed_by_digit = chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if c == '.' && !followed_by_digit && removed < VQA_MAX_PERIODS_STRIPPED {
            removed += 1;
        } else {
            out.push(c);
        }
    }
    out
}

fn process_vqa_digits_and_articles(text: &str) -> String {
    let lookup = |table: &[(&str, &'static str)], word: &str| {
        table
            .iter()
            .find(|(from, _)| *from == word)
            .map(|(_, to)| *to)
    };
    text.to_lowercase()
        .split_whitespace()
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
    let matches: Vec<bool> = ground_truth_answers
        .iter()
        .map(|a| normalize_vqa_answer(a) == prediction)
        .collect();
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

// ---------------------------------------------------------------- ChartQA

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

// ---------------------------------------------------------------- MMBench

/// Option letters in order; option `i` of a question is `OPTION_LETTERS[i]`.
pub const OPTION_LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Replies the MMBench evaluator treats as refusals (its `Z` answer).
const MMBENCH_REFUSALS: [&str; 4] = [
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
];

enum LetterInference {
    Letter(char),
    Refusal,
    Undecided,
}

/// The option a free-form answer picks, by the MMBench evaluator's `can_infer`:
/// exactly one option letter standing alone as a word, else exactly one
/// option text contained in the answer (case-insensitive). Refusals and
/// ambiguous answers give `None`.
pub fn infer_option_letter(answer: &str, options: &[String]) -> Option<char> {
    let letters: Vec<char> = OPTION_LETTERS.chars().take(options.len()).collect();
    match infer_letter_from_words(answer, &letters) {
        LetterInference::Letter(letter) => Some(letter),
        LetterInference::Refusal => None,
        LetterInference::Undecided => infer_letter_from_option_text(answer, options),
    }
}

fn infer_letter_from_words(answer: &str, letters: &[char]) -> LetterInference {
    if MMBENCH_REFUSALS
        .iter()
        .any(|refusal| answer.contains(refusal))
    {
        return LetterInference::Refusal;
    }
    let spaced = answer.replace(
        [
            '.', '(', ')', '[', ']', ',', ':', ';', '!', '*', '#', '{', '}',
        ],
        " ",
    );
    let words: Vec<&str> = spaced.split_whitespace().collect();
    let is_word = |letter: char| words.iter().any(|w| w.len() == 1 && w.starts_with(letter));
    let found: Vec<char> = letters.iter().copied().filter(|&l| is_word(l)).collect();
    match found[..] {
        [letter] => LetterInference::Letter(letter),
        [] if is_word('Z') => LetterInference::Refusal,
        _ => LetterInference::Undecided,
    }
}

fn infer_letter_from_option_text(answer: &str, options: &[String]) -> Option<char> {
    let answer = answer.to_lowercase();
    let mut contained = OPTION_LETTERS
        .chars()
        .zip(options)
        .filter(|(_, option)| answer.contains(&option.to_lowercase()))
        .map(|(letter, _)| letter);
    match (contained.next(), contained.next()) {
        (Some(letter), None) => Some(letter),
        _ => None,
    }
}

/// MMBench numbers the circular variants of question `i` as `i + k * stride`.
pub const MMBENCH_CIRCULAR_STRIDE: u64 = 1_000_000;

/// MMBench's circular-evaluation group of a TSV row: variants of a question
/// share `index % 1e6`.
pub fn mmbench_circular_group(index: u64) -> u64 {
    index % MMBENCH_CIRCULAR_STRIDE
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmBenchAccuracy {
    pub correct: usize,
    pub total: usize,
    /// Groups whose every circular variant was answered correctly.
    pub circular_correct: usize,
    pub circular_groups: usize,
}

/// Plain and circular accuracy from `(TSV index, answered correctly)` pairs.
pub fn mmbench_accuracy(results: &[(u64, bool)]) -> MmBenchAccuracy {
    let mut groups: BTreeMap<u64, bool> = BTreeMap::new();
    for &(index, correct) in results {
        *groups.entry(mmbench_circular_group(index)).or_insert(true) &= correct;
    }
    MmBenchAccuracy {
        correct: results.iter().filter(|(_, correct)| *correct).count(),
        total: results.len(),
        circular_correct: groups.values().filter(|&&all_correct| all_correct).count(),
        circular_groups: groups.len(),
    }
}

// ---------------------------------------------------------------- MathVista

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
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+").expect("valid regex")
});
static BRACKETED_LIST: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[[^\[\]]*\]").expect("valid regex"));
static PARENTHESISED_LETTER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\(([a-zA-Z])\)").expect("valid regex"));

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
    if problem.question_type == MathVistaQuestionType::MultiChoice
        && problem.choices().iter().any(|c| c == response)
    {
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
        return infer_option_letter(response, problem.choices()).map(String::from);
    }
    match problem.answer_type {
        MathVistaAnswerType::Integer | MathVistaAnswerType::Float => NUMBER
            .find_iter(response)
            .last()
            .map(|m| m.as_str().replace(',', "")),
        MathVistaAnswerType::List => BRACKETED_LIST
            .find_iter(response)
            .last()
            .map(|m| m.as_str().to_string()),
        MathVistaAnswerType::Text => Some(response.trim().to_string()).filter(|t| !t.is_empty()),
    }
}

/// `normalize_extracted_answer`: multi-choice extractions become the text of
/// the chosen option (a letter, `(X)`, or else the most similar option by
/// edit distance); integers `str(int(float(x)))`; floats
/// `str(round(float(x), precision))`; `None` when a number does not parse.
pub fn normalize_mathvista_answer(extraction: &str, problem: &MathVistaProblem) -> Option<String> {
    if problem.question_type == MathVistaQuestionType::MultiChoice {
        let choices = problem.choices();
        let extraction = extraction.trim();
        let letter = match PARENTHESISED_LETTER.captures(extraction) {
            Some(captures) => captures[1].to_uppercase(),
            None => extraction.to_string(),
        };
        let letter_index = OPTION_LETTERS
            .chars()
            .take(choices.len())
            .position(|l| letter == l.to_string());
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
        let distance = levenshtein(text, choice);
        if best.is_none_or(|(best_distance, _)| distance < best_distance) {
            best = Some((distance, choice));
        }
    }
    best.map(|(_, choice)| choice)
}

/// Edit distance over Unicode scalar values (insertions, deletions, substitutions).
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Extraction, normalisation and `safe_equal` against the answer.
pub fn mathvista_is_correct(
    response: &str,
    problem: &MathVistaProblem,
    llm_extractor: Option<LlmAnswerExtractor>,
) -> bool {
    let extraction = extract_mathvista_answer(response, problem, llm_extractor);
    normalize_mathvista_answer(&extraction, problem)
        .is_some_and(|normalized| normalized == problem.answer)
}

// ---------------------------------------------------------------- LLaVA-Bench and MM-Vet

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
        by_category
            .entry(category.clone())
            .or_default()
            .push(*scores);
        by_category
            .entry("all".to_string())
            .or_default()
            .push(*scores);
    }
    by_category
        .into_iter()
        .map(|(category, pairs)| {
            let mean = |k: usize| {
                python_round(
                    pairs.iter().map(|p| p[k]).sum::<f64>() / pairs.len() as f64,
                    3,
                )
            };
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
        by_capability: by_capability
            .into_iter()
            .map(|(capability, sums)| (capability, percent(sums)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
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
    fn python_float_parsing_matches_float_builtin() {
        assert_eq!(parse_python_float(" 12.5 "), Some(12.5));
        assert_eq!(parse_python_float("1_000.5"), Some(1000.5));
        assert_eq!(parse_python_float("1e3"), Some(1000.0));
        assert_eq!(parse_python_float(".5"), Some(0.5));
        assert!(parse_python_float("-Infinity").unwrap().is_infinite());
        assert_eq!(parse_python_float("1,000"), None);
        assert_eq!(parse_python_float("_1"), None);
        assert_eq!(parse_python_float("1__0"), None);
        assert_eq!(parse_python_float("12%"), None);
    }

    #[test]
    fn python_int_parsing_matches_int_builtin() {
        assert_eq!(parse_python_int(" +007 ").as_deref(), Some("7"));
        assert_eq!(parse_python_int("-0").as_deref(), Some("0"));
        assert_eq!(parse_python_int("1_000").as_deref(), Some("1000"));
        assert_eq!(parse_python_int("12.0"), None);
        assert_eq!(parse_python_int("-"), None);
        assert_eq!(parse_python_int("1e3"), None);
    }

    #[test]
    fn python_round_is_half_even_on_the_binary_value() {
        assert_eq!(python_round(0.125, 2), 0.12); // exact tie, rounds to even
        assert_eq!(python_round(0.375, 2), 0.38);
        assert_eq!(python_round(2.675, 2), 2.67); // 2.675 is stored as 2.67499...
        assert_eq!(python_round(2.5, 0), 2.0);
        assert_eq!(python_round(1.456, 2), 1.46);
    }

    #[test]
    fn python_float_repr_matches_repr() {
        assert_eq!(python_float_repr(3.0), "3.0");
        assert_eq!(python_float_repr(0.0), "0.0");
        assert_eq!(python_float_repr(-0.0), "-0.0");
        assert_eq!(python_float_repr(1.46), "1.46");
        assert_eq!(python_float_repr(123456.0), "123456.0");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(-2.5e20), "-2.5e+20");
        assert_eq!(python_float_repr(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn scienceqa_letter_parsing_follows_eval_science_qa() {
        assert_eq!(parse_scienceqa_letter("B"), Some('B'));
        assert_eq!(parse_scienceqa_letter("C. opaque"), Some('C'));
        assert_eq!(parse_scienceqa_letter("The answer is D."), Some('D'));
        // The regex allows any capital; the index check rejects it later.
        assert_eq!(
            parse_scienceqa_letter("Answer: The answer is F."),
            Some('F')
        );
        // Two sentences are ambiguous, a lowercase letter or a missing trailing character never match.
        assert_eq!(
            parse_scienceqa_letter("The answer is A. The answer is B."),
            None
        );
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

    #[test]
    fn option_inference_follows_can_infer() {
        let options = strings(&["red apple", "green pear", "yellow banana"]);
        assert_eq!(infer_option_letter("B", &options), Some('B'));
        assert_eq!(
            infer_option_letter("(C) yellow banana.", &options),
            Some('C')
        );
        assert_eq!(
            infer_option_letter("The answer is A: red apple", &options),
            Some('A')
        );
        // "D" is not an option here, so it does not count; no text matches either.
        assert_eq!(infer_option_letter("D", &options), None);
        // Two letters are ambiguous, then text matching decides.
        assert_eq!(
            infer_option_letter("A or B, it is the green pear", &options),
            Some('B')
        );
        // '?' is not a separator, so "B?" is no letter and "A" stands alone.
        assert_eq!(
            infer_option_letter("A or B? It is the green pear", &options),
            Some('A')
        );
        // Text matching alone, case-insensitive.
        assert_eq!(
            infer_option_letter("It looks like a Yellow Banana", &options),
            Some('C')
        );
        assert_eq!(infer_option_letter("apple or pear", &options), None);
        // Refusals and a lone Z are refusals, not text matches.
        assert_eq!(
            infer_option_letter("Cannot determine the answer: red apple", &options),
            None
        );
        assert_eq!(infer_option_letter("Z", &options), None);
    }

    #[test]
    fn mmbench_plain_and_circular_accuracy() {
        let results = [
            (7, true),
            (1_000_007, true),
            (2_000_007, true), // group 7: all right
            (8, true),
            (1_000_008, false), // group 8: one variant wrong
            (9, false),         // group 9: single variant wrong
        ];
        let accuracy = mmbench_accuracy(&results);
        assert_eq!(
            accuracy,
            MmBenchAccuracy {
                correct: 4,
                total: 6,
                circular_correct: 1,
                circular_groups: 3
            }
        );
        assert_eq!(mmbench_circular_group(3_000_042), 42);
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
        assert_eq!(
            extract_mathvista_answer("The correct answer is (B) 8/11.", &problem, None),
            "B"
        );
        assert_eq!(
            normalize_mathvista_answer("B", &problem).as_deref(),
            Some("8/11")
        );
        assert_eq!(
            normalize_mathvista_answer("(b) something", &problem).as_deref(),
            Some("8/11")
        );
        // Not a letter: the closest option by edit distance ("8/12" is one edit from "8/11").
        assert_eq!(
            normalize_mathvista_answer("8/12", &problem).as_deref(),
            Some("8/11")
        );
        assert!(mathvista_is_correct("B", &problem, None));
        assert!(!mathvista_is_correct("A", &problem, None));
    }

    #[test]
    fn mathvista_numeric_extraction_and_normalisation() {
        let integer = mathvista(
            MathVistaQuestionType::FreeForm,
            MathVistaAnswerType::Integer,
            None,
            None,
            "14",
        );
        assert_eq!(extract_mathvista_answer(" 14 ", &integer, None), "14");
        assert_eq!(
            extract_mathvista_answer("The number missing is 14.", &integer, None),
            "14"
        );
        assert_eq!(
            extract_mathvista_answer("From 1,200 down to 14", &integer, None),
            "14"
        );
        assert_eq!(
            normalize_mathvista_answer("14.9", &integer).as_deref(),
            Some("14")
        ); // int() truncates
        assert_eq!(
            normalize_mathvista_answer("-3.5", &integer).as_deref(),
            Some("-3")
        );
        assert_eq!(normalize_mathvista_answer("fourteen", &integer), None);
        assert!(mathvista_is_correct(
            "The answer is \"14\".",
            &integer,
            None
        ));

        let float = mathvista(
            MathVistaQuestionType::FreeForm,
            MathVistaAnswerType::Float,
            None,
            Some(2.0),
            "1.45",
        );
        assert_eq!(extract_mathvista_answer("1.450", &float, None), "1.45"); // str(float(x))
        assert_eq!(
            normalize_mathvista_answer("1.4537", &float).as_deref(),
            Some("1.45")
        );
        assert!(mathvista_is_correct(
            "Luca needs $1.45 in total.",
            &float,
            None
        ));
        let one_decimal = mathvista(
            MathVistaQuestionType::FreeForm,
            MathVistaAnswerType::Float,
            None,
            Some(1.0),
            "3.0",
        );
        assert_eq!(
            normalize_mathvista_answer("3", &one_decimal).as_deref(),
            Some("3.0")
        );
        let no_precision = mathvista(
            MathVistaQuestionType::FreeForm,
            MathVistaAnswerType::Float,
            None,
            None,
            "3.0",
        );
        assert_eq!(normalize_mathvista_answer("3", &no_precision), None);
    }

    #[test]
    fn mathvista_rules_stand_in_without_an_llm() {
        let list = mathvista(
            MathVistaQuestionType::FreeForm,
            MathVistaAnswerType::List,
            None,
            None,
            "[2007, 2008]",
        );
        assert!(mathvista_is_correct(
            "The peak lies in [2007, 2008].",
            &list,
            None
        ));

        let text = mathvista(
            MathVistaQuestionType::FreeForm,
            MathVistaAnswerType::Text,
            None,
            None,
            "Paris",
        );
        assert_eq!(extract_mathvista_answer("  Paris ", &text, None), "Paris");
        assert_eq!(extract_mathvista_answer("", &text, None), "");

        // The official --quick_extract rule is one of the stand-ins without an LLM.
        assert_eq!(
            extract_mathvista_answer("Capital. The answer is \"Paris\".", &text, None),
            "Paris"
        );
    }

    #[test]
    fn mathvista_with_an_llm_every_response_past_the_direct_checks_goes_to_it() {
        let integer = mathvista(
            MathVistaQuestionType::FreeForm,
            MathVistaAnswerType::Integer,
            None,
            None,
            "3",
        );
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
        assert_eq!(
            *asked.borrow(),
            ["three apples", "The answer is \"5\".", "It is (B) 8/11.", "no idea", "no idea"]
        );
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
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("héllo", "hello"), 1);
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
        assert_eq!(
            summary["conv"],
            LlavaBenchSummary {
                relative: 77.8,
                reference: 90.0,
                model: 70.0
            }
        );
        // all: means (17/3 = 5.667) and (13/3 = 4.333) -> 4.333/5.667 = 76.46% -> 76.5.
        assert_eq!(
            summary["all"],
            LlavaBenchSummary {
                relative: 76.5,
                reference: 56.7,
                model: 43.3
            }
        );
        assert_eq!(summary["detail"].relative, 100.0);
    }

    #[test]
    fn numpy_round_rounds_the_scaled_product() {
        // 0.35 is stored as 0.34999..., but 0.35 * 10 rounds to 3.5, a tie that rint sends to 4.
        assert_eq!(numpy_round(0.35, 1), 0.4);
        assert_eq!(python_round(0.35, 1), 0.3);
        assert_eq!(numpy_round(0.15, 1), 0.2);
        // 51.650000000000006 * 10 rounds to 516.5 exactly: to even, 516.
        assert_eq!(numpy_round(51.650000000000006, 1), 51.6);
        assert_eq!(python_round(51.650000000000006, 1), 51.7);
        assert_eq!(numpy_round(66.66666666666667, 1), 66.7);
        assert_eq!(numpy_round(12.25, 1), 12.2);
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
        let thirds = vec![
            (strings(&["rec"]), 1.0),
            (strings(&["rec"]), 1.0),
            (strings(&["rec"]), 0.0),
        ];
        assert_eq!(mm_vet_summary(&thirds).total, 66.7);

        // 7 grades of 0.1 among 200 samples: 0.7 / 200 * 100 = 0.35 (stored below 0.35), which the
        // official NumPy rounding reports as 0.4 (Python's round would say 0.3).
        let mut sparse = vec![(strings(&["ocr"]), 0.1); 7];
        sparse.resize(200, (strings(&["ocr"]), 0.0));
        let summary = mm_vet_summary(&sparse);
        assert_eq!((summary.total, summary.by_capability["ocr"]), (0.4, 0.4));
    }
}
