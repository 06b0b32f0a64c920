//! The HTTP client: one chat completion per request, with bounded retries, the reply cache in front, and the
//! grading calls of LLaVA-Bench, MM-Vet and MathVista.
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::cache::{cache_key, ReplyCache};
use super::parse::{parse_mm_vet_score, parse_review_scores};
use super::prompts::*;
use super::JudgeError;
use crate::eval::python;

#[derive(Debug, Clone, PartialEq)]
pub struct JudgeConfig {
    /// API base (`.../v1`) or the full `.../chat/completions` endpoint.
    pub url: String,
    pub model: String,
    /// Environment variable holding the API key; unset or empty sends no
    /// `Authorization` header (local servers).
    pub api_key_env: String,
    pub timeout: Duration,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for every further one.
    pub backoff_base: Duration,
    /// JSONL file of cached replies; `None` disables caching.
    pub cache_path: Option<PathBuf>,
    /// Independent runs of the LLaVA-Bench review (`--judge-runs`): every run asks each request anew.
    pub runs: u32,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            url: "https://api.openai.com/v1".to_string(),
            model: "gpt-4-0613".to_string(),
            api_key_env: "OPENAI_API_KEY".to_string(),
            timeout: Duration::from_secs(120),
            max_attempts: 6,
            backoff_base: Duration::from_secs(2),
            cache_path: None,
            runs: 1,
        }
    }
}

impl JudgeConfig {
    pub fn endpoint(&self) -> String {
        let url = self.url.trim_end_matches('/');
        if url.ends_with("/chat/completions") {
            url.to_string()
        } else {
            format!("{url}/chat/completions")
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage { role: "system".to_string(), content: content.into() }
    }

    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage { role: "user".to_string(), content: content.into() }
    }
}

/// Counters over the client's lifetime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JudgeStats {
    pub http_requests: u64,
    pub retries: u64,
    pub cache_hits: u64,
    /// Successful HTTP replies whose body was not a chat completion.
    pub malformed_replies: u64,
    /// Replies from which a grading helper could not read a score.
    pub unparsable_scores: u64,
}

enum AttemptFailure {
    Retryable(JudgeError),
    Fatal(JudgeError),
}

pub struct JudgeClient {
    config: JudgeConfig,
    endpoint: String,
    agent: ureq::Agent,
    cache: Option<Mutex<ReplyCache>>,
    stats: Mutex<JudgeStats>,
}

impl JudgeClient {
    pub fn new(config: JudgeConfig) -> Result<Self, JudgeError> {
        let endpoint = config.endpoint();
        let mut agent_config =
            ureq::Agent::config_builder().timeout_global(Some(config.timeout)).http_status_as_error(false);
        if is_loopback_url(&endpoint) {
            // A local server must never be reached through a proxy from the environment.
            agent_config = agent_config.proxy(None);
        }
        let cache = match &config.cache_path {
            Some(path) => Some(Mutex::new(ReplyCache::open(path).map_err(|e| JudgeError::Cache(Box::new(e)))?)),
            None => None,
        };
        Ok(JudgeClient {
            endpoint,
            agent: agent_config.build().into(),
            cache,
            stats: Mutex::new(JudgeStats::default()),
            config,
        })
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.config
    }

    pub fn stats(&self) -> JudgeStats {
        *self.stats.lock().expect("stats lock")
    }

    fn count(&self, update: impl FnOnce(&mut JudgeStats)) {
        update(&mut self.stats.lock().expect("stats lock"));
    }

    /// The assistant's reply to `messages`, from the cache when this exact
    /// request was answered before.
    pub fn complete(&self, messages: &[ChatMessage], temperature: f64, max_tokens: u32) -> Result<String, JudgeError> {
        self.complete_in_run(messages, temperature, max_tokens, 1)
    }

    /// [`Self::complete`] in judge run `run` (from 1), whose replies are cached apart from the other runs'.
    fn complete_in_run(
        &self,
        messages: &[ChatMessage],
        temperature: f64,
        max_tokens: u32,
        run: u32,
    ) -> Result<String, JudgeError> {
        let key = cache_key(&self.config.model, messages, temperature, run);
        if let Some(cache) = &self.cache {
            if let Some(reply) = cache.lock().expect("cache lock").get(&key) {
                self.count(|s| s.cache_hits += 1);
                return Ok(reply.clone());
            }
        }
        let body = json!({
            "model": self.config.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        })
        .to_string();
        let reply = self.post_with_retries(&body)?;
        if let Some(cache) = &self.cache {
            cache.lock().expect("cache lock").insert(key, reply.clone()).map_err(|e| JudgeError::Cache(Box::new(e)))?;
        }
        Ok(reply)
    }

    fn post_with_retries(&self, body: &str) -> Result<String, JudgeError> {
        let mut attempt = 1;
        loop {
            match self.post_once(body) {
                Ok(reply) => return Ok(reply),
                Err(AttemptFailure::Retryable(_)) if attempt < self.config.max_attempts => {
                    self.count(|s| s.retries += 1);
                    std::thread::sleep(self.config.backoff_base * 2u32.saturating_pow(attempt - 1));
                    attempt += 1;
                }
                Err(AttemptFailure::Retryable(error) | AttemptFailure::Fatal(error)) => return Err(error),
            }
        }
    }

    fn post_once(&self, body: &str) -> Result<String, AttemptFailure> {
        self.count(|s| s.http_requests += 1);
        let mut request = self.agent.post(&self.endpoint).content_type("application/json");
        if let Some(key) = std::env::var(&self.config.api_key_env).ok().filter(|k| !k.is_empty()) {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response =
            request.send(body).map_err(|e| AttemptFailure::Retryable(JudgeError::Transport(e.to_string())))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| AttemptFailure::Retryable(JudgeError::Transport(e.to_string())))?;
        match status {
            200..=299 => self.reply_content(&text).map_err(AttemptFailure::Fatal),
            429 | 500..=599 => Err(AttemptFailure::Retryable(JudgeError::Http { status, body: text })),
            _ => Err(AttemptFailure::Fatal(JudgeError::Http { status, body: text })),
        }
    }

    fn reply_content(&self, body: &str) -> Result<String, JudgeError> {
        let malformed = |reason: &str| {
            self.count(|s| s.malformed_replies += 1);
            JudgeError::MalformedReply { reason: reason.to_string(), body: body.to_string() }
        };
        let value: Value = serde_json::from_str(body).map_err(|_| malformed("not JSON"))?;
        value
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| malformed("no choices[0].message.content"))
    }

    fn unparsable(&self, reply: String) -> JudgeError {
        self.count(|s| s.unparsable_scores += 1);
        JudgeError::UnparsableScore { reply }
    }

    /// LLaVA-Bench review as `eval_gpt_review_bench.py` runs it, in judge run `run` (from 1): the pair
    /// `[reference (GPT-4) score, model score]`.
    pub fn review_llava_bench(&self, input: &LlavaBenchReviewInput, run: u32) -> Result<[f64; 2], JudgeError> {
        let messages =
            [ChatMessage::system(LLAVA_BENCH_SYSTEM_PROMPT), ChatMessage::user(llava_bench_review_prompt(input))];
        let review = self.complete_in_run(&messages, LLAVA_BENCH_TEMPERATURE, LLAVA_BENCH_MAX_TOKENS, run)?;
        parse_review_scores(&review).ok_or_else(|| self.unparsable(review))
    }

    /// MM-Vet grade in [0, 1], as `mm-vet_evaluator.py` grades one run. An
    /// unreadable reply (or one without content) is asked again with the
    /// "Predict the correctness" suffix: temperatures 0.0, 0.0, 0.5, 1.0, 1.5.
    /// After five unreadable replies the error is returned; the official
    /// loop then makes a sixth call (at 2.0) whose reply it never reads and
    /// records 0.0, so that call is skipped here.
    pub fn grade_mm_vet(&self, question: &str, ground_truth: &str, prediction: &str) -> Result<f64, JudgeError> {
        const READ_REPLIES: u32 = 5;
        const TEMPERATURE_STEP: f64 = 0.5;
        let prompt = mm_vet_grader_prompt(question, ground_truth, prediction);
        let mut content = prompt.clone();
        let mut temperature = 0.0;
        let mut reply = String::new();
        for call in 1..=READ_REPLIES {
            match self.complete(&[ChatMessage::user(content.as_str())], temperature, MM_VET_MAX_TOKENS) {
                Ok(text) => reply = text,
                Err(JudgeError::MalformedReply { body, .. }) => reply = body,
                Err(error) => return Err(error),
            }
            if let Some(score) = parse_mm_vet_score(&reply) {
                return Ok(score);
            }
            content = format!("{prompt}{MM_VET_RETRY_SUFFIX}");
            // The official loop raises the temperature only after the first re-ask.
            if call > 1 {
                temperature += TEMPERATURE_STEP;
            }
        }
        Err(self.unparsable(reply))
    }

    /// MathVista's GPT answer extraction (`extract_answer.py`: few-shot
    /// prompt, temperature 0, at most 1024 tokens, reply stripped).
    pub fn extract_mathvista_answer(&self, query: &str, response: &str) -> Result<String, JudgeError> {
        let prompt = mathvista_extraction_prompt(query, response);
        self.complete(&[ChatMessage::user(prompt)], 0.0, MATHVISTA_MAX_TOKENS)
            .map(|reply| python::strip(&reply).to_string())
    }
}

fn is_loopback_url(url: &str) -> bool {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{completion, server_url_that_refuses, test_client, StubServer};
    use super::*;

    #[test]
    fn endpoint_accepts_base_or_full_url() {
        let base = JudgeConfig { url: "http://127.0.0.1:8000/v1/".to_string(), ..JudgeConfig::default() };
        assert_eq!(base.endpoint(), "http://127.0.0.1:8000/v1/chat/completions");
        let full = JudgeConfig { url: "http://h/v1/chat/completions".to_string(), ..JudgeConfig::default() };
        assert_eq!(full.endpoint(), "http://h/v1/chat/completions");
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_url("http://127.0.0.1:9/v1"));
        assert!(is_loopback_url("http://localhost/v1"));
        assert!(is_loopback_url("http://[::1]:80/v1"));
        assert!(!is_loopback_url("https://api.openai.com/v1"));
    }

    #[test]
    fn retries_429_and_500_then_caches_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let cache_path = dir.path().join("judge_cache.jsonl");
        let server = StubServer::start(vec![
            (429, "{\"error\":\"slow down\"}".to_string()),
            (500, "oops".to_string()),
            (200, completion("8 9\nBoth answers are good.")),
        ]);
        let judge = test_client(&server.url, Some(cache_path.clone()));
        let messages = [ChatMessage::user("rate this")];
        assert_eq!(judge.complete(&messages, 0.2, 16).unwrap(), "8 9\nBoth answers are good.");
        let bodies = server.finish();
        assert_eq!(bodies.len(), 3);
        let sent: Value = serde_json::from_str(&bodies[2]).unwrap();
        assert_eq!(sent["model"], judge.config().model);
        assert_eq!(sent["messages"][0]["content"], "rate this");
        assert_eq!(sent["max_tokens"], 16);
        assert_eq!(judge.stats(), JudgeStats { http_requests: 3, retries: 2, ..JudgeStats::default() });

        // The server is gone: a repeat must come from the cache, in this client and in a new one.
        assert_eq!(judge.complete(&messages, 0.2, 16).unwrap(), "8 9\nBoth answers are good.");
        assert_eq!(judge.stats().cache_hits, 1);
        // The cache file is locked while its client lives.
        drop(judge);
        let reopened = test_client(&server_url_that_refuses(), Some(cache_path));
        assert_eq!(reopened.complete(&messages, 0.2, 16).unwrap(), "8 9\nBoth answers are good.");
        assert_eq!(reopened.stats(), JudgeStats { cache_hits: 1, ..JudgeStats::default() });
    }

    #[test]
    fn transport_errors_are_retried_up_to_the_attempt_limit() {
        let judge = test_client(&server_url_that_refuses(), None);
        let error = judge.complete(&[ChatMessage::user("x")], 0.0, 3).unwrap_err();
        assert!(matches!(error, JudgeError::Transport(_)), "{error}");
        assert_eq!(judge.stats(), JudgeStats { http_requests: 4, retries: 3, ..JudgeStats::default() });
    }

    #[test]
    fn client_errors_are_not_retried() {
        let server = StubServer::start(vec![(401, "{\"error\":\"bad key\"}".to_string())]);
        let judge = test_client(&server.url, None);
        let error = judge.complete(&[ChatMessage::user("x")], 0.0, 3).unwrap_err();
        assert!(matches!(error, JudgeError::Http { status: 401, .. }), "{error}");
        assert_eq!(server.finish().len(), 1);
    }

    #[test]
    fn malformed_replies_are_counted_and_returned_as_errors() {
        let server = StubServer::start(vec![
            (200, "not json".to_string()),
            (200, "{\"choices\":[]}".to_string()),
            (200, completion("great answers")),
        ]);
        let judge = test_client(&server.url, None);
        for prompt in ["a", "b"] {
            let error = judge.complete(&[ChatMessage::user(prompt)], 0.0, 3).unwrap_err();
            assert!(matches!(error, JudgeError::MalformedReply { .. }), "{error}");
        }
        let input = LlavaBenchReviewInput {
            rule: llava_bench_rule("conv").unwrap(),
            context: "A cat.".to_string(),
            question: "What is it?".to_string(),
            reference_answer: "A cat.".to_string(),
            model_answer: "A dog.".to_string(),
        };
        let error = judge.review_llava_bench(&input, 1).unwrap_err();
        assert!(matches!(error, JudgeError::UnparsableScore { .. }), "{error}");
        server.finish();
        let stats = judge.stats();
        assert_eq!((stats.malformed_replies, stats.unparsable_scores, stats.retries), (2, 1, 0));
    }

    #[test]
    fn llava_bench_review_sends_the_official_prompt_and_parses_scores() {
        let server = StubServer::start(vec![(200, completion("7 6\nAssistant 1 is more detailed."))]);
        let judge = test_client(&server.url, None);
        let rule = llava_bench_rule("complex").unwrap();
        let input = LlavaBenchReviewInput {
            rule,
            context: "A red bus.\nIt is parked.".to_string(),
            question: "What color is the bus?".to_string(),
            reference_answer: "Red.".to_string(),
            model_answer: "It is red.".to_string(),
        };
        assert_eq!(judge.review_llava_bench(&input, 1).unwrap(), [7.0, 6.0]);
        let sent: Value = serde_json::from_str(&server.finish()[0]).unwrap();
        assert_eq!(sent["temperature"], 0.2);
        assert_eq!(sent["max_tokens"], 1024);
        assert_eq!(sent["messages"].as_array().unwrap().len(), 2);
        assert_eq!(sent["messages"][0]["role"], "system");
        assert_eq!(
            sent["messages"][0]["content"],
            "You are a helpful and precise assistant for checking the quality of the answer."
        );
        assert_eq!(sent["messages"][1]["role"], "user");
        assert_eq!(
            sent["messages"][1]["content"],
            format!(
                "[Context]\nA red bus.\nIt is parked.\n\n[Question]\nWhat color is the bus?\n\n[Assistant 1]\nRed.\n\n[End of Assistant 1]\n\n[Assistant 2]\nIt is red.\n\n[End of Assistant 2]\n\n[System]\n{}\n\n",
                rule.prompt
            )
        );
    }

    #[test]
    fn mm_vet_grading_retries_unreadable_replies_with_the_digit_suffix() {
        let server = StubServer::start(vec![(200, completion("The answer")), (200, completion("0.6"))]);
        let judge = test_client(&server.url, None);
        assert_eq!(judge.grade_mm_vet("What is x?", "-1<AND>-5", "x = -1").unwrap(), 0.6);
        let bodies = server.finish();
        let first: Value = serde_json::from_str(&bodies[0]).unwrap();
        let second: Value = serde_json::from_str(&bodies[1]).unwrap();
        let first_prompt = first["messages"][0]["content"].as_str().unwrap();
        // `prompt + "\n" + " | ".join([question, answer with spaced <AND>/<OR>, prediction, ""])`.
        assert_eq!(first_prompt, format!("{MM_VET_GRADER_PROMPT}\nWhat is x? | -1 <AND> -5 | x = -1 | "));
        assert_eq!(first["messages"].as_array().unwrap().len(), 1);
        assert_eq!(first["messages"][0]["role"], "user");
        assert_eq!(first["max_tokens"], 3);
        assert_eq!(
            second["messages"][0]["content"],
            format!("{first_prompt}\nPredict the correctness of the answer (digit): ")
        );
        assert_eq!((first["temperature"].as_f64(), second["temperature"].as_f64()), (Some(0.0), Some(0.0)));
    }

    #[test]
    fn mm_vet_reply_without_content_is_asked_again() {
        let no_content = json!({ "choices": [{ "message": { "role": "assistant", "content": null } }] }).to_string();
        let server = StubServer::start(vec![(200, no_content), (200, completion("1.0"))]);
        let judge = test_client(&server.url, None);
        assert_eq!(judge.grade_mm_vet("q", "a<OR>b", "b").unwrap(), 1.0);
        let bodies = server.finish();
        assert!(bodies[1].contains("Predict the correctness of the answer (digit): "));
        assert_eq!(judge.stats().malformed_replies, 1);
    }

    #[test]
    fn mm_vet_grading_gives_up_after_five_calls() {
        let server = StubServer::start((0..5).map(|_| (200, completion("maybe"))).collect());
        let judge = test_client(&server.url, None);
        let error = judge.grade_mm_vet("q", "a", "p").unwrap_err();
        assert!(matches!(error, JudgeError::UnparsableScore { .. }), "{error}");
        let temperatures: Vec<f64> = server
            .finish()
            .iter()
            .map(|body| serde_json::from_str::<Value>(body).unwrap()["temperature"].as_f64().unwrap())
            .collect();
        assert_eq!(temperatures, [0.0, 0.0, 0.5, 1.0, 1.5]);
        assert_eq!(judge.stats().unparsable_scores, 1);
    }

    #[test]
    fn mathvista_extraction_prompt_and_call() {
        let prompt = mathvista_extraction_prompt("Question: How many?", "There are 3.");
        // `demo_prompt.strip()`, then "\n\n{query}\n\n{response}\n\nExtracted answer: ".
        assert!(prompt.starts_with("Please read the following example. Then extract the answer from the model response and type it at the end of the prompt.\n\nHint: Please answer the question requiring an integer answer"));
        assert!(prompt.ends_with(
            "(D) 3/5\n\nModel response: The correct answer is (B) 8/11.\n\nExtracted answer: B\n\nQuestion: How many?\n\nThere are 3.\n\nExtracted answer: "
        ));
        assert_eq!(prompt.matches("Extracted answer: ").count(), 6);
        let server = StubServer::start(vec![(200, completion(" 3 \n"))]);
        let judge = test_client(&server.url, None);
        assert_eq!(judge.extract_mathvista_answer("Question: How many?", "There are 3.").unwrap(), "3");
        let sent: Value = serde_json::from_str(&server.finish()[0]).unwrap();
        assert_eq!(sent["messages"][0]["content"], prompt);
        assert_eq!(sent["messages"][0]["role"], "user");
        assert_eq!(sent["temperature"], 0.0);
        assert_eq!(sent["max_tokens"], 1024);
    }
}
