//! MMBench (dev): LLaVA's `mmbench_dev_20230712.tsv` (base64 images) or the `lmms-lab/MMBench` parquet release,
//! prompted as `model_vqa_mmbench.py` prompts and scored with the MMBench evaluator's option matching and
//! circular evaluation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Answer, Benchmark, LoadOptions, MissingPrediction, MmBenchOptions, Score, ScoreError, ANSWER_WITH_OPTION_LETTER,
    OPTION_LETTERS,
};
use crate::eval::files::{invalid, json_text, require, to_meta, EvalDataError};
use crate::eval::hub_parquet::{ImageColumn, ParquetRelease};
use crate::eval::item::{EvalItem, ImageSource};
use crate::eval::judge::JudgeClient;
use crate::eval::python;

const NAME: &str = "mmbench";

pub struct MmBench;

impl Benchmark for MmBench {
    fn name(&self) -> &'static str {
        NAME
    }

    fn load(&self, data_dir: &Path, options: &LoadOptions) -> Result<Vec<EvalItem>, EvalDataError> {
        load_mmbench(data_dir, options.mmbench_circular, options.mmbench_options)
    }

    /// LLaVA's `convert_mmbench_for_submission.py` leaves the prediction of an unanswered row empty, which
    /// VLMEvalKit reads as NaN and grades as the text `nan` (wrong, and so is the row's circular group).
    fn missing_prediction(&self) -> MissingPrediction {
        MissingPrediction::StandIn { text: "nan", with_image: true }
    }

    /// The headline is circular accuracy; with one variant per question it
    /// equals plain accuracy.
    fn score(&self, answers: &[Answer], _judge: Option<&JudgeClient>) -> Result<Score, ScoreError> {
        let mut results = Vec::with_capacity(answers.len());
        let mut options_cut = 0usize;
        for entry in answers {
            let meta: MmBenchMeta = entry.meta(NAME)?;
            options_cut += usize::from(meta.llava_options < meta.choices.len());
            let answer = meta.answer.ok_or_else(|| ScoreError::MissingAnswer(entry.item.id.clone()))?;
            let chosen = infer_option_letter(entry.prediction, &meta.choices);
            results.push(MmBenchResult {
                index: meta.index,
                correct: chosen.is_some_and(|letter| answer == letter.to_string()),
                category: meta.category,
                l2_category: meta.l2_category,
            });
        }
        let graded = CircularGroups::of(&results);
        let accuracy = graded.accuracy();
        let plain = Score::new("plain", accuracy.correct as f64, accuracy.total);
        Ok(Score::new(NAME, accuracy.circular_correct as f64, accuracy.circular_groups)
            .with_extra("plain_accuracy", plain.accuracy)
            .with_extra("plain_correct", accuracy.correct)
            .with_extra("plain_total", accuracy.total)
            .with_extra("options_cut", options_cut)
            .with_extra(CATEGORY_ACCURACY, to_meta(graded.accuracy_by(|r| r.category.as_deref())))
            .with_extra(L2_CATEGORY_ACCURACY, to_meta(graded.accuracy_by(|r| r.l2_category.as_deref()))))
    }
}

/// The `summary.json` extras with the accuracy per `category` and per `l2-category` column ([`AccuracyBy`]).
pub const CATEGORY_ACCURACY: &str = "category_accuracy";
pub const L2_CATEGORY_ACCURACY: &str = "l2_category_accuracy";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmBenchMeta {
    /// The TSV index of this variant; variants of one question share `index % 1e6`.
    pub index: u64,
    /// The correct letter in this variant's option order; absent in test splits.
    pub answer: Option<String>,
    /// The options the scorer reads, in this variant's order: (letter, text). The prompt lists them all, or
    /// with `--mmbench-options official` the first `llava_options` of them.
    pub choices: Vec<Choice>,
    /// How many of `choices` LLaVA's `get_options` lists.
    pub llava_options: usize,
    pub category: Option<String>,
    /// The ability one level up from `category` (MMBench's L2 ability).
    pub l2_category: Option<String>,
}

/// An option's letter and text.
pub type Choice = (char, String);

/// Options lettered from A, as MathVista and LLaVA's prompts list them.
pub fn lettered(options: &[String]) -> Vec<Choice> {
    OPTION_LETTERS.chars().zip(options.iter().cloned()).collect()
}

/// What pandas 2 reads as NaN by default (`read_csv`'s `na_values`), the test of VLMEvalKit's `pd.isna`.
fn is_pandas_na(cell: &str) -> bool {
    const PANDAS_NA_VALUES: [&str; 19] = [
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
        "NULL", "NaN", "None", "n/a", "nan", "null",
    ];
    PANDAS_NA_VALUES.contains(&cell)
}

/// LLaVA's `is_none` on a cell pandas read: NaN, or the text "nan" or "none" in any case.
fn is_llava_none(cell: &str) -> bool {
    is_pandas_na(cell) || cell.eq_ignore_ascii_case("nan") || cell.eq_ignore_ascii_case("none")
}

/// The option letters LLaVA's `model_vqa_mmbench.py` reads (`all_options`).
const LLAVA_OPTION_LETTERS: &str = "ABCD";

/// The options LLaVA's `get_options` lists of `choices` (VLMEvalKit's, so a cell pandas reads as NaN is no
/// choice): A, B, C, D in order up to the first letter without a choice or with one `is_none` rejects.
fn llava_get_options(choices: &[Choice]) -> &[Choice] {
    let listed = choices
        .iter()
        .zip(LLAVA_OPTION_LETTERS.chars())
        .take_while(|((letter, text), expected)| letter == expected && !is_llava_none(text))
        .count();
    &choices[..listed]
}

struct MmBenchRow {
    index: u64,
    question: String,
    hint: Option<String>,
    choices: Vec<Choice>,
    answer: Option<String>,
    category: Option<String>,
    l2_category: Option<String>,
    image: ImageSource,
}

impl MmBenchRow {
    /// A row from its cells by column name (`None` where the column or the value is absent).
    fn new(cell: impl Fn(&str) -> Option<String>, image: ImageSource) -> Result<Self, String> {
        let index = cell("index").unwrap_or_default();
        let present = |name: &str| cell(name).filter(|value| !is_pandas_na(value));
        Ok(MmBenchRow {
            index: index.trim().parse().map_err(|_| format!("index {index:?} is not a whole number"))?,
            question: cell("question").ok_or("no question")?,
            // `model_vqa_mmbench.py` drops a hint `is_none` rejects.
            hint: cell("hint").filter(|hint| !is_llava_none(hint)),
            // VLMEvalKit's `build_choices`: every letter column whose cell is not NaN, with its letter (LLaVA's
            // `get_options`, `llava_get_options`, stops at the first cell `is_none` rejects).
            choices: OPTION_LETTERS
                .chars()
                .filter_map(|letter| present(&letter.to_string()).map(|text| (letter, text)))
                .collect(),
            answer: present("answer"),
            category: present("category"),
            // `l2-category` in LLaVA's TSV, `L2-category` in lmms-lab/MMBench.
            l2_category: present("l2-category").or_else(|| present("L2-category")),
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
fn mmbench_prompt(hint: Option<&str>, question: &str, choices: &[Choice]) -> String {
    let mut prompt = match hint {
        Some(hint) => format!("{hint}\n{question}"),
        None => question.to_string(),
    };
    for (letter, option) in choices {
        prompt.push_str(&format!("\n{letter}. {option}"));
    }
    format!("{prompt}\n{ANSWER_WITH_OPTION_LETTER}")
}

fn read_mmbench_rows(path: &Path) -> Result<Vec<MmBenchRow>, EvalDataError> {
    let tsv_error = |source| EvalDataError::Tsv { path: path.to_path_buf(), source };
    // `flexible`: short rows read as missing cells, as pandas reads them as NaN.
    let mut reader = csv::ReaderBuilder::new().delimiter(b'\t').flexible(true).from_path(path).map_err(tsv_error)?;
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
        MmBenchRow::new(|name| cells.get(name).filter(|value| !value.is_null()).map(json_text), image)
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
                invalid(path, format!("row {index}: image {encoded:?} is neither base64 nor a row index"))
            })?;
    }
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| invalid(path, format!("row {index}: image is not valid base64: {e}")))
}

fn load_mmbench(data_dir: &Path, circular: bool, shown: MmBenchOptions) -> Result<Vec<EvalItem>, EvalDataError> {
    // Where the rows come from, for errors about one of them.
    let (path, rows) = match MMBENCH_PARQUET.instead_of(data_dir, &[MMBENCH_TSV])? {
        Some(files) => (data_dir.to_path_buf(), read_mmbench_parquet(&files)?),
        None => {
            let path = require(
                NAME,
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
            items.push(mmbench_item(&row, row.index, row.choices.clone(), row.answer.clone(), shown));
            continue;
        }
        if row.index >= MMBENCH_CIRCULAR_STRIDE {
            continue;
        }
        let answer_position = match &row.answer {
            Some(answer) => Some(
                row.choices
                    .iter()
                    .position(|(letter, _)| answer == &letter.to_string())
                    .ok_or_else(|| invalid(&path, format!("row {}: answer {answer:?} is not an option", row.index)))?,
            ),
            None => None,
        };
        // The texts turn over the letters; the answer's letter moves with its text.
        let count = row.choices.len();
        for shift in 0..count {
            let mut texts: Vec<String> = row.choices.iter().map(|(_, text)| text.clone()).collect();
            texts.rotate_left(shift);
            let rotated: Vec<Choice> = row.choices.iter().map(|(letter, _)| *letter).zip(texts).collect();
            let answer = answer_position.map(|p| row.choices[(p + count - shift) % count].0.to_string());
            let index = row.index + shift as u64 * MMBENCH_CIRCULAR_STRIDE;
            items.push(mmbench_item(&row, index, rotated, answer, shown));
        }
    }
    Ok(items)
}

/// A question variant; its prompt lists the options `shown` asks for (LLaVA's of a rotation are those
/// `get_options` lists of a TSV row with the rotated cells, as MMBench's own circular copies are).
fn mmbench_item(
    row: &MmBenchRow,
    index: u64,
    choices: Vec<Choice>,
    answer: Option<String>,
    shown: MmBenchOptions,
) -> EvalItem {
    let llava_options = llava_get_options(&choices).len();
    let listed = match shown {
        MmBenchOptions::All => &choices[..],
        MmBenchOptions::Official => &choices[..llava_options],
    };
    EvalItem {
        id: index.to_string(),
        image: row.image.clone(),
        question: mmbench_prompt(row.hint.as_deref(), &row.question, listed),
        meta: to_meta(MmBenchMeta {
            index,
            answer,
            choices,
            llava_options,
            category: row.category.clone(),
            l2_category: row.l2_category.clone(),
        }),
    }
}

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
pub fn infer_option_letter(answer: &str, choices: &[Choice]) -> Option<char> {
    let letters: Vec<char> = choices.iter().map(|(letter, _)| *letter).collect();
    match infer_letter_from_words(answer, &letters) {
        LetterInference::Letter(letter) => Some(letter),
        LetterInference::Refusal => None,
        LetterInference::Undecided => infer_letter_from_option_text(answer, choices),
    }
}

fn infer_letter_from_words(answer: &str, letters: &[char]) -> LetterInference {
    if MMBENCH_REFUSALS.iter().any(|refusal| answer.contains(refusal)) {
        return LetterInference::Refusal;
    }
    let spaced = answer.replace(['.', '(', ')', '[', ']', ',', ':', ';', '!', '*', '#', '{', '}'], " ");
    let words: Vec<&str> = python::split(&spaced).collect();
    let is_word = |letter: char| words.iter().any(|w| w.len() == 1 && w.starts_with(letter));
    let found: Vec<char> = letters.iter().copied().filter(|&l| is_word(l)).collect();
    match found[..] {
        [letter] => LetterInference::Letter(letter),
        [] if is_word('Z') => LetterInference::Refusal,
        _ => LetterInference::Undecided,
    }
}

fn infer_letter_from_option_text(answer: &str, choices: &[Choice]) -> Option<char> {
    let answer = answer.to_lowercase();
    let mut contained =
        choices.iter().filter(|(_, option)| answer.contains(&option.to_lowercase())).map(|(letter, _)| *letter);
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

/// One graded question variant.
#[derive(Debug, Clone, PartialEq)]
pub struct MmBenchResult {
    /// The TSV index, which names the circular group.
    pub index: u64,
    pub correct: bool,
    pub category: Option<String>,
    pub l2_category: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmBenchAccuracy {
    pub correct: usize,
    pub total: usize,
    /// Groups whose every circular variant was answered correctly.
    pub circular_correct: usize,
    pub circular_groups: usize,
}

/// A circular group: whether every variant was answered correctly, and its lowest-index variant (the question
/// itself where it was graded), whose categories VLMEvalKit reports the group under.
struct CircularGroup<'a> {
    all_correct: bool,
    question: &'a MmBenchResult,
}

/// The graded variants of a run and their circular groups, grouped once for every count made of them.
pub struct CircularGroups<'a> {
    results: &'a [MmBenchResult],
    groups: BTreeMap<u64, CircularGroup<'a>>,
}

impl<'a> CircularGroups<'a> {
    pub fn of(results: &'a [MmBenchResult]) -> Self {
        let mut groups: BTreeMap<u64, CircularGroup> = BTreeMap::new();
        for result in results {
            let group = groups
                .entry(mmbench_circular_group(result.index))
                .or_insert(CircularGroup { all_correct: true, question: result });
            group.all_correct &= result.correct;
            if result.index < group.question.index {
                group.question = result;
            }
        }
        Self { results, groups }
    }

    /// Plain and circular accuracy.
    pub fn accuracy(&self) -> MmBenchAccuracy {
        MmBenchAccuracy {
            correct: self.results.iter().filter(|result| result.correct).count(),
            total: self.results.len(),
            circular_correct: self.groups.values().filter(|group| group.all_correct).count(),
            circular_groups: self.groups.len(),
        }
    }

    /// VLMEvalKit's `report_acc` per `category` or `l2-category`: the circular groups of each label, a group
    /// correct only when every variant is, as the headline counts them. Groups without the label are left out.
    pub fn accuracy_by(&self, label: impl Fn(&'a MmBenchResult) -> Option<&'a str>) -> AccuracyBy {
        let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for group in self.groups.values() {
            if let Some(name) = label(group.question) {
                let (correct, total) = counts.entry(name.to_string()).or_default();
                *correct += usize::from(group.all_correct);
                *total += 1;
            }
        }
        counts
            .into_iter()
            .map(|(name, (correct, total))| {
                let accuracy = Score::new(name.as_str(), correct as f64, total).accuracy;
                (name, LabelAccuracy { accuracy, correct, total })
            })
            .collect()
    }
}

/// The accuracy of the circular groups of one label.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LabelAccuracy {
    pub accuracy: f64,
    pub correct: usize,
    pub total: usize,
}

/// Accuracy per label, in label order.
pub type AccuracyBy = BTreeMap<String, LabelAccuracy>;

#[cfg(test)]
mod tests {
    use super::super::score;
    use super::super::test_support::{load, missing_file_message, predictions, strings, write, TINY_PNG_BASE64};
    use super::*;

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
            [dir.path().join("en/dev-00000-of-00002-a.parquet"), dir.path().join("en/dev-00001-of-00002-b.parquet")]
        );
        std::fs::remove_dir_all(dir.path().join("en")).unwrap();
        assert_eq!(MMBENCH_PARQUET.files(dir.path()).unwrap(), [dir.path().join("dev-00000-of-00001.parquet")]);
    }

    fn mmbench_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit";
        let rows = [
            format!("0\tWhat color is the sky?\tnan\tred\tblue\tgreen\t\tB\tattribute\t{TINY_PNG_BASE64}\tsrc\tl2\tnan\tdev"),
            "1\tWhich one is a fruit?\tLook at the table.\tapple\tstone\tnone\tsand\tC\tobject\t0\tsrc\tl2\tnan\tdev".to_string(),
            "1000000\tWhat color is the sky?\tnan\tblue\tgreen\tred\t\tA\tattribute\t0\tsrc\tl2\tnan\tdev".to_string(),
        ];
        write(dir.path(), "mmbench_dev_20230712.tsv", &format!("{header}\n{}\n", rows.join("\n")));
        dir
    }

    #[test]
    fn mmbench_rows_become_llava_prompts_with_decoded_images() {
        let dir = mmbench_dir();
        let items = load(&MmBench, dir.path()).unwrap();
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["0", "1", "1000000"]);
        assert_eq!(
            items[0].question,
            "What color is the sky?\nA. red\nB. blue\nC. green\nAnswer with the option's letter from the given choices directly."
        );
        // A hint goes first; an option that reads "none" is an option (VLMEvalKit's build_choices; LLaVA's
        // get_options would stop there and lose D).
        assert_eq!(
            items[1].question,
            "Look at the table.\nWhich one is a fruit?\nA. apple\nB. stone\nC. none\nD. sand\nAnswer with the option's letter from the given choices directly."
        );
        let png = base64::engine::general_purpose::STANDARD.decode(TINY_PNG_BASE64).unwrap();
        assert_eq!(items[0].image, ImageSource::Bytes(png.clone()));
        assert_eq!(items[1].image, ImageSource::Bytes(png), "a short image cell refers to another row's image");
        let meta: MmBenchMeta = items[0].meta_as().unwrap();
        assert_eq!(meta.answer.as_deref(), Some("B"));
        assert_eq!((meta.category.as_deref(), meta.l2_category.as_deref()), (Some("attribute"), Some("l2")));
    }

    #[test]
    fn mmbench_circular_load_rotates_options_and_answers() {
        let dir = mmbench_dir();
        let options = LoadOptions { mmbench_circular: true, ..LoadOptions::default() };
        let items = MmBench.load(dir.path(), &options).unwrap();
        // Row 0 has 3 options -> 3 rotations; row 1 has 4 -> 4; the file's own copy 1000000 is skipped.
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["0", "1000000", "2000000", "1", "1000001", "2000001", "3000001"]);
        let answers: Vec<String> = items.iter().map(|i| i.meta_as::<MmBenchMeta>().unwrap().answer.unwrap()).collect();
        // "blue" is B; shifted once it is first (A); shifted twice it is last (C). Row 1's answer is the option
        // "none" (C): with LLaVA's options it would not be an option at all, and --circular would refuse the row.
        assert_eq!(answers, ["B", "A", "C", "C", "B", "A", "D"]);
        assert_eq!(
            items[2].question,
            "What color is the sky?\nA. green\nB. red\nC. blue\nAnswer with the option's letter from the given choices directly."
        );

        // Group 0 has one wrong rotation, group 1 is all right: circular 1/2, plain 6/7.
        let preds = predictions(&[
            ("0", "B"),
            ("1000000", "A"),
            ("2000000", "A"),
            ("1", "C. none"),
            ("1000001", "B"),
            ("2000001", "none"),
            ("3000001", "D"),
        ]);
        let score = score(&MmBench, &items, &preds, None).unwrap();
        assert_eq!((score.correct, score.total, score.accuracy), (1.0, 2, 0.5));
        assert_eq!(score.extra["plain_accuracy"], 6.0 / 7.0);
        // Group 0 is row 0's question (attribute), group 1 row 1's (object); both have the L2 category "l2".
        assert_eq!(
            score.extra["category_accuracy"],
            serde_json::json!({
                "attribute": {"accuracy": 0.0, "correct": 0, "total": 1},
                "object": {"accuracy": 1.0, "correct": 1, "total": 1},
            })
        );
        assert_eq!(
            score.extra["l2_category_accuracy"],
            serde_json::json!({"l2": {"accuracy": 0.5, "correct": 1, "total": 2}})
        );
    }

    #[test]
    fn official_options_stop_where_llava_get_options_stops() {
        let dir = mmbench_dir();
        let official = LoadOptions { mmbench_options: MmBenchOptions::Official, ..LoadOptions::default() };
        let items = MmBench.load(dir.path(), &official).unwrap();
        // Row 1's option C reads "none": LLaVA lists A and B only; the scorer still reads all four.
        assert_eq!(
            items[1].question,
            "Look at the table.\nWhich one is a fruit?\nA. apple\nB. stone\nAnswer with the option's letter from the given choices directly."
        );
        let meta: MmBenchMeta = items[1].meta_as().unwrap();
        assert_eq!((meta.choices.len(), meta.llava_options), (4, 2));
        assert_eq!(items[0].question, load(&MmBench, dir.path()).unwrap()[0].question, "nothing to cut in row 0");
        // Either way, summary.json counts the questions whose prompt LLaVA cuts.
        for options in [official, LoadOptions::default()] {
            let items = MmBench.load(dir.path(), &options).unwrap();
            let preds = predictions(&[("0", "B"), ("1", "C"), ("1000000", "A")]);
            assert_eq!(score(&MmBench, &items, &preds, None).unwrap().extra["options_cut"], 1);
        }
        // A rotation lists what get_options lists of the rotated cells: "none" first leaves no option at all.
        let circular = LoadOptions { mmbench_circular: true, ..official };
        let items = MmBench.load(dir.path(), &circular).unwrap();
        let listed: Vec<usize> = items.iter().map(|i| i.meta_as::<MmBenchMeta>().unwrap().llava_options).collect();
        assert_eq!(listed, [3, 3, 3, 2, 1, 0, 3]);
        // At most A to D, as LLaVA's all_options.
        let five = lettered(&strings(&["a", "b", "c", "d", "e"]));
        assert_eq!(llava_get_options(&five).len(), 4);
        // "None" is NaN to pandas: no choice B, so LLaVA stops there.
        assert_eq!(llava_get_options(&[('A', "yes".to_string()), ('C', "no".to_string())]).len(), 1);
    }

    #[test]
    fn missing_predictions_are_graded_as_vlmevalkit_reads_them() {
        // An unanswered row's prediction is NaN in the upload sheet; VLMEvalKit grades str(NaN), "nan".
        let dir = mmbench_dir();
        let items = load(&MmBench, dir.path()).unwrap();
        let score = score(&MmBench, &items, &predictions(&[("0", "B"), ("1", "C")]), None).unwrap();
        // Row 1000000 (group 0's copy) is missing: wrong, and so is group 0.
        assert_eq!((score.correct, score.total, score.missing_predictions), (1.0, 2, 1));
        assert_eq!((score.extra["plain_correct"].as_u64(), score.extra["plain_total"].as_u64()), (Some(2), Some(3)));
        // "nan" is an answer like any other: it contains the option text "Nan" (not NaN to pandas).
        let choices = [('A', "Nan".to_string()), ('B', "Bread".to_string())];
        assert_eq!(infer_option_letter("nan", &choices), Some('A'));
    }

    #[test]
    fn mmbench_options_are_the_letter_columns_pandas_reads_as_text() {
        // pandas reads "None" as NaN: VLMEvalKit drops that column and keeps the letters of the others.
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "mmbench_dev_20230712.tsv",
            &format!("index\tquestion\tA\tB\tC\tanswer\timage\n3\tIs it?\tyes\tNone\tno\tC\t{TINY_PNG_BASE64}\n"),
        );
        let circular = LoadOptions { mmbench_circular: true, ..LoadOptions::default() };
        let items = MmBench.load(dir.path(), &circular).unwrap();
        assert_eq!(
            items[0].question,
            "Is it?\nA. yes\nC. no\nAnswer with the option's letter from the given choices directly."
        );
        let meta: MmBenchMeta = items[1].meta_as().unwrap();
        assert_eq!(meta.choices, [('A', "no".to_string()), ('C', "yes".to_string())]);
        assert_eq!(meta.answer.as_deref(), Some("A"));
        // "B" is no option here, so it is not read as one.
        assert_eq!(infer_option_letter("B", &meta.choices), None);
    }

    #[test]
    fn mmbench_bad_image_reference_and_missing_tsv_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let message = missing_file_message(&MmBench, dir.path());
        assert!(
            message.contains("mmbench_dev_20230712.tsv")
                && message.contains("lmms-lab/MMBench's parquet release")
                && message.contains("en/dev-*.parquet"),
            "{message}"
        );
        write(dir.path(), "mmbench_dev_20230712.tsv", "index\tquestion\tA\tB\tanswer\timage\n5\tq\tx\ty\tA\t42\n");
        let error = load(&MmBench, dir.path()).unwrap_err();
        assert!(error.to_string().contains("neither base64 nor a row index"), "{error}");
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
        let mut writer =
            parquet::file::writer::SerializedFileWriter::new(file, std::sync::Arc::new(schema), Default::default())
                .unwrap();
        let mut row_group = writer.next_row_group().unwrap();
        for values in columns {
            let mut column = row_group.next_column().unwrap().unwrap();
            match values {
                Column::Int64(values) => column.typed::<Int64Type>().write_batch(&values, None, None),
                Column::Text(values) => {
                    let levels: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
                    let present: Vec<ByteArray> = values.iter().flatten().map(|v| ByteArray::from(*v)).collect();
                    column.typed::<ByteArrayType>().write_batch(&present, Some(&levels), None)
                }
                Column::Binary(values) => {
                    let values: Vec<ByteArray> = values.into_iter().map(ByteArray::from).collect();
                    column.typed::<ByteArrayType>().write_batch(&values, None, None)
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
        let png = base64::engine::general_purpose::STANDARD.decode(TINY_PNG_BASE64).unwrap();
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
        let items = load(&MmBench, dir.path()).unwrap();
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["0", "1"]);
        assert_eq!(
            items[0].question,
            "What color is the sky?\nA. red\nB. blue\nC. green\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(
            items[1].question,
            "Look at the table.\nWhich one is a fruit?\nA. apple\nB. stone\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(items[1].image, ImageSource::Bytes(png));
        assert_eq!(items[0].meta_as::<MmBenchMeta>().unwrap().answer.as_deref(), Some("B"));
    }

    #[test]
    fn missing_cells_follow_pandas_and_llava() {
        for cell in ["", "nan", "NaN", "None", "NA", "null"] {
            assert!(is_pandas_na(cell) && is_llava_none(cell), "{cell:?}");
        }
        // Text to pandas, None to LLaVA's is_none.
        for cell in ["none", "NONE", "NAN"] {
            assert!(!is_pandas_na(cell) && is_llava_none(cell), "{cell:?}");
        }
        for cell in ["0", "none of these", "N", "apple"] {
            assert!(!is_pandas_na(cell) && !is_llava_none(cell), "{cell:?}");
        }
    }

    #[test]
    fn option_inference_follows_can_infer() {
        let options = lettered(&strings(&["red apple", "green pear", "yellow banana"]));
        assert_eq!(infer_option_letter("B", &options), Some('B'));
        assert_eq!(infer_option_letter("(C) yellow banana.", &options), Some('C'));
        assert_eq!(infer_option_letter("The answer is A: red apple", &options), Some('A'));
        // "D" is not an option here, so it does not count; no text matches either.
        assert_eq!(infer_option_letter("D", &options), None);
        // Two letters are ambiguous, then text matching decides.
        assert_eq!(infer_option_letter("A or B, it is the green pear", &options), Some('B'));
        // '?' is not a separator, so "B?" is no letter and "A" stands alone.
        assert_eq!(infer_option_letter("A or B? It is the green pear", &options), Some('A'));
        // Text matching alone, case-insensitive.
        assert_eq!(infer_option_letter("It looks like a Yellow Banana", &options), Some('C'));
        assert_eq!(infer_option_letter("apple or pear", &options), None);
        // Refusals and a lone Z are refusals, not text matches.
        assert_eq!(infer_option_letter("Cannot determine the answer: red apple", &options), None);
        assert_eq!(infer_option_letter("Z", &options), None);
    }

    fn graded(index: u64, correct: bool, category: Option<&str>, l2_category: Option<&str>) -> MmBenchResult {
        MmBenchResult {
            index,
            correct,
            category: category.map(str::to_string),
            l2_category: l2_category.map(str::to_string),
        }
    }

    #[test]
    fn mmbench_plain_circular_and_per_category_accuracy() {
        let (ocr, celebrity, scene) = (Some("ocr"), Some("celebrity_recognition"), Some("image_scene"));
        let (fine, coarse) = (Some("finegrained_perception"), Some("coarse_perception"));
        let results = [
            graded(7, true, ocr, fine),
            graded(1_000_007, true, ocr, fine),
            graded(2_000_007, true, ocr, fine), // group 7: all right
            graded(8, true, ocr, fine),
            graded(1_000_008, false, ocr, fine), // group 8: one variant wrong
            graded(9, false, celebrity, fine),   // group 9: single variant wrong
            graded(10, true, scene, coarse),
            graded(1_000_010, true, scene, coarse), // group 10: all right
            graded(11, true, None, None),           // group 11: right, without categories
            // Group 12: all right; its labels are its question's (index 12), not those of the variant seen first.
            graded(2_000_012, true, Some("image_style"), Some("other")),
            graded(12, true, scene, coarse),
        ];
        // Plain: 9 of the 11 variants; circular: groups 7, 10, 11 and 12 of the 6.
        let graded = CircularGroups::of(&results);
        let accuracy = graded.accuracy();
        assert_eq!(accuracy, MmBenchAccuracy { correct: 9, total: 11, circular_correct: 4, circular_groups: 6 });
        assert_eq!(mmbench_circular_group(3_000_042), 42);

        // Per label, one count per group: ocr has groups 7 (right) and 8 (wrong), celebrity group 9 (wrong), scene
        // groups 10 and 12 (both right); finegrained is 7, 8 and 9, coarse 10 and 12. Group 11 has no label.
        let counts = |by: AccuracyBy| -> Vec<(String, usize, usize)> {
            by.into_iter().map(|(name, a)| (name, a.correct, a.total)).collect()
        };
        assert_eq!(
            counts(graded.accuracy_by(|r| r.category.as_deref())),
            [("celebrity_recognition".into(), 0, 1), ("image_scene".into(), 2, 2), ("ocr".into(), 1, 2)]
        );
        let by_l2 = graded.accuracy_by(|r| r.l2_category.as_deref());
        assert_eq!(by_l2["finegrained_perception"].accuracy, 1.0 / 3.0);
        assert_eq!(counts(by_l2), [("coarse_perception".into(), 2, 2), ("finegrained_perception".into(), 1, 3)]);
    }
}
