//! The judges' prompts as the official scripts send them. The texts are the official ones, shipped as data under
//! third_party/ (sources, commits and licences in the README files there).
use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Deserialize;

use crate::eval::python;

// ---------------------------------------------------------------- LLaVA-Bench

/// The judge `eval_gpt_review_bench.py` calls.
pub const LLAVA_BENCH_JUDGE_MODEL: &str = "gpt-4-0314";
pub(super) const LLAVA_BENCH_TEMPERATURE: f64 = 0.2;
/// The script's `--max-tokens` default.
pub(super) const LLAVA_BENCH_MAX_TOKENS: u32 = 1024;

/// `eval_gpt_review_bench.py`'s system message.
pub const LLAVA_BENCH_SYSTEM_PROMPT: &str = include_str!("../../../third_party/llava/review_system_prompt.txt");

/// An entry of LLaVA's `llava/eval/table/rule.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReviewRule {
    pub role: String,
    pub prompt: String,
}

pub(super) static LLAVA_REVIEW_RULES: LazyLock<HashMap<String, ReviewRule>> = LazyLock::new(|| {
    serde_json::from_str(include_str!("../../../third_party/llava/rule.json")).expect("the shipped rule.json parses")
});

/// The rule `eval_gpt_review_bench.py` reviews a question of `category`
/// ("conv", "detail", "complex") with: `rule.json["llava_bench_" + category]`.
pub fn llava_bench_rule(category: &str) -> Option<&'static ReviewRule> {
    LLAVA_REVIEW_RULES.get(&format!("llava_bench_{category}"))
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlavaBenchReviewInput {
    /// The rule of the question's category.
    pub rule: &'static ReviewRule,
    /// The image's caption(s) from `context.jsonl`, joined by newlines.
    pub context: String,
    pub question: String,
    /// GPT-4's answer from `answers_gpt4.jsonl` (Assistant 1).
    pub reference_answer: String,
    /// The evaluated model's answer (Assistant 2).
    pub model_answer: String,
}

pub fn llava_bench_review_prompt(input: &LlavaBenchReviewInput) -> String {
    let LlavaBenchReviewInput { rule: ReviewRule { role, prompt }, context, question, reference_answer, model_answer } =
        input;
    format!(
        "[Context]\n{context}\n\n[Question]\n{question}\n\n[{role} 1]\n{reference_answer}\n\n[End of {role} 1]\n\n[{role} 2]\n{model_answer}\n\n[End of {role} 2]\n\n[System]\n{prompt}\n\n"
    )
}

// ---------------------------------------------------------------- MM-Vet

/// `mm-vet_evaluator.py`'s `--gpt_model` default.
pub const MM_VET_JUDGE_MODEL: &str = "gpt-4-0613";
pub(super) const MM_VET_MAX_TOKENS: u32 = 3;

/// The few-shot grading table of `mm-vet_evaluator.py` (its `prompt`).
pub const MM_VET_GRADER_PROMPT: &str = include_str!("../../../third_party/mm-vet/grader_prompt.txt");
/// Appended to the sample's row when a reply is not a score in [0, 1].
pub const MM_VET_RETRY_SUFFIX: &str = include_str!("../../../third_party/mm-vet/retry_suffix.txt");

/// The few-shot table plus this sample's row with an empty last cell.
pub fn mm_vet_grader_prompt(question: &str, ground_truth: &str, prediction: &str) -> String {
    let ground_truth = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ");
    format!("{MM_VET_GRADER_PROMPT}\n{}", [question, ground_truth.as_str(), prediction, ""].join(" | "))
}

// ---------------------------------------------------------------- MathVista

/// `extract_answer.py` takes its model from the environment; the README's
/// extractor is GPT-4, and the first release's `--llm_engine` default was this.
pub const MATHVISTA_JUDGE_MODEL: &str = "gpt-4-0613";
/// `GPT_Model`'s `max_tokens` default.
pub(super) const MATHVISTA_MAX_TOKENS: u32 = 1024;

/// `demo_prompt` of `evaluation/prompts/ext_ans.py`.
pub(super) const MATHVISTA_DEMO_PROMPT: &str = include_str!("../../../third_party/mathvista/demo_prompt.txt");

/// `create_test_prompt`: the stripped few-shot demo, then the query and the response.
pub fn mathvista_extraction_prompt(query: &str, response: &str) -> String {
    format!("{}\n\n{query}\n\n{response}\n\nExtracted answer: ", python::strip(MATHVISTA_DEMO_PROMPT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::provenance::sha256_hex;

    /// The shipped texts are the official ones (third_party/*/README.md lists
    /// the same digests): a changed byte fails here.
    #[test]
    fn shipped_prompts_are_the_official_texts() {
        assert_eq!(
            LLAVA_BENCH_SYSTEM_PROMPT,
            "You are a helpful and precise assistant for checking the quality of the answer."
        );
        assert_eq!(
            sha256_hex(include_str!("../../../third_party/llava/rule.json").as_bytes()),
            "dd7345a44ce9f7a24e51a30ee030cdab32346f9d08e3359c80545ff1312b1e07"
        );
        assert_eq!(
            sha256_hex(MM_VET_GRADER_PROMPT.as_bytes()),
            "d1b3e0a5b4e72c888b77164489d705bba4dd149934fff564dfba6443d81afe3f"
        );
        assert_eq!(MM_VET_RETRY_SUFFIX, "\nPredict the correctness of the answer (digit): ");
        assert_eq!(
            sha256_hex(MATHVISTA_DEMO_PROMPT.as_bytes()),
            "a231722ced09cbd1f3fd16630ab58bf487f12e2f46ea0b26d1f2f6b5c50fb17c"
        );
        // The few-shot demo's `\n` escapes are newlines in Python's string, and so in the prompt.
        assert!(MATHVISTA_DEMO_PROMPT.contains(
            "Question: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5\n"
        ));
        assert!(!MATHVISTA_DEMO_PROMPT.contains('\\'));
        assert!(MM_VET_GRADER_PROMPT
            .ends_with("between the names of the countries and their actual physical characteristics. | 1.0\n"));
    }

    #[test]
    fn llava_bench_rules_come_from_rule_json() {
        let conv = llava_bench_rule("conv").unwrap();
        assert_eq!(conv.role, "Assistant");
        assert!(conv.prompt.starts_with("We would like to request your feedback on the performance of two AI assistants in response to the user question displayed above. The user asks the question on observing an image. For your reference, the visual content in the image is represented with a few sentences describing the image. \nPlease rate the helpfulness"));
        assert!(conv
            .prompt
            .ends_with("ensuring that the order in which the responses were presented does not affect your judgment."));
        assert_eq!(llava_bench_rule("detail"), Some(conv));
        assert_eq!(llava_bench_rule("complex"), Some(conv));
        // Only the llava_bench_ entries: the unprefixed "conv" rule (COCO boxes) is another text.
        assert_ne!(LLAVA_REVIEW_RULES["conv"].prompt, conv.prompt);
        assert_eq!(llava_bench_rule("default"), None);
        assert_eq!(llava_bench_rule("ocr"), None);
    }
}
