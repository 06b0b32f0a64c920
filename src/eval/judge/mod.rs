//! An OpenAI-compatible chat-completions client for the judge-based parts of
//! the evaluation (LLaVA-Bench reviews, MM-Vet grading, MathVista answer
//! extraction), with bounded retries and an on-disk reply cache so that an
//! interrupted run does not pay for the same request twice.
//!
//! `client` sends the requests, `cache` keeps the replies, `prompts` builds the official prompts and `parse`
//! reads the scores out of the replies.
mod cache;
mod client;
mod parse;
mod prompts;
#[cfg(test)]
pub(crate) mod test_support;

pub use cache::cache_key;
pub use client::{ChatMessage, JudgeClient, JudgeConfig, JudgeStats};
pub use parse::{parse_mm_vet_score, parse_review_scores};
pub use prompts::{
    llava_bench_review_prompt, llava_bench_rule, mathvista_extraction_prompt, mm_vet_grader_prompt,
    LlavaBenchReviewInput, ReviewRule, LLAVA_BENCH_JUDGE_MODEL, LLAVA_BENCH_SYSTEM_PROMPT, MATHVISTA_JUDGE_MODEL,
    MM_VET_GRADER_PROMPT, MM_VET_JUDGE_MODEL, MM_VET_RETRY_SUFFIX,
};

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge endpoint answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("could not reach the judge endpoint: {0}")]
    Transport(String),
    #[error("malformed judge reply ({reason}): {body}")]
    MalformedReply { reason: String, body: String },
    #[error("no score in judge reply: {reply:?}")]
    UnparsableScore { reply: String },
    /// The reply cache could not be opened or written (its errors name the file).
    #[error("judge cache {0}")]
    Cache(Box<crate::Error>),
}
