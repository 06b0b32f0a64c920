//! An OpenAI-compatible chat-completions client for the judge-based parts of
//! the evaluation (LLaVA-Bench reviews, MM-Vet grading, MathVista answer
//! extraction), with bounded retries and an on-disk reply cache so that an
//! interrupted run does not pay for the same request twice.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::python::{self, parse_python_float};

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
        ChatMessage {
            role: "system".to_string(),
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".to_string(),
            content: content.into(),
        }
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
    #[error("judge cache {path}: {source}")]
    Cache { path: PathBuf, source: io::Error },
}

/// Replies already paid for, keyed by `cache_key`, mirrored in an
/// append-only JSONL file.
struct ReplyCache {
    replies: HashMap<String, String>,
    file: File,
}

#[derive(Serialize, Deserialize)]
struct CacheLine {
    key: String,
    reply: String,
}

impl ReplyCache {
    fn open(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        // A run killed mid-write leaves a torn last line: skip it, and start
        // the next record on a fresh line.
        let replies = text
            .lines()
            .filter_map(|line| serde_json::from_str::<CacheLine>(line).ok())
            .map(|line| (line.key, line.reply))
            .collect();
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        Ok(ReplyCache { replies, file })
    }

    fn insert(&mut self, key: String, reply: String) -> io::Result<()> {
        let record = CacheLine { key, reply };
        let mut line = serde_json::to_string(&record)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()?;
        self.replies.insert(record.key, record.reply);
        Ok(())
    }
}

/// sha256 over the model, the messages and the temperature.
pub fn cache_key(model: &str, messages: &[ChatMessage], temperature: f64) -> String {
    let identity = json!({ "model": model, "messages": messages, "temperature": temperature });
    let digest = Sha256::digest(identity.to_string().as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
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
        let mut agent_config = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false);
        if is_loopback_url(&endpoint) {
            // A local server must never be reached through a proxy from the environment.
            agent_config = agent_config.proxy(None);
        }
        let cache = match &config.cache_path {
            Some(path) => Some(Mutex::new(ReplyCache::open(path).map_err(|source| {
                JudgeError::Cache {
                    path: path.clone(),
                    source,
                }
            })?)),
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
    pub fn complete(
        &self,
        messages: &[ChatMessage],
        temperature: f64,
        max_tokens: u32,
    ) -> Result<String, JudgeError> {
        let key = cache_key(&self.config.model, messages, temperature);
        if let Some(cache) = &self.cache {
            if let Some(reply) = cache.lock().expect("cache lock").replies.get(&key) {
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
            cache
                .lock()
                .expect("cache lock")
                .insert(key, reply.clone())
                .map_err(|source| JudgeError::Cache {
                    path: self.config.cache_path.clone().unwrap_or_default(),
                    source,
                })?;
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
                Err(AttemptFailure::Retryable(error) | AttemptFailure::Fatal(error)) => {
                    return Err(error)
                }
            }
        }
    }

    fn post_once(&self, body: &str) -> Result<String, AttemptFailure> {
        self.count(|s| s.http_requests += 1);
        let mut request = self
            .agent
            .post(&self.endpoint)
            .content_type("application/json");
        if let Some(key) = std::env::var(&self.config.api_key_env)
            .ok()
            .filter(|k| !k.is_empty())
        {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = request
            .send(body)
            .map_err(|e| AttemptFailure::Retryable(JudgeError::Transport(e.to_string())))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| AttemptFailure::Retryable(JudgeError::Transport(e.to_string())))?;
        match status {
            200..=299 => self.reply_content(&text).map_err(AttemptFailure::Fatal),
            429 | 500..=599 => Err(AttemptFailure::Retryable(JudgeError::Http {
                status,
                body: text,
            })),
            _ => Err(AttemptFailure::Fatal(JudgeError::Http {
                status,
                body: text,
            })),
        }
    }

    fn reply_content(&self, body: &str) -> Result<String, JudgeError> {
        let malformed = |reason: &str| {
            self.count(|s| s.malformed_replies += 1);
            JudgeError::MalformedReply {
                reason: reason.to_string(),
                body: body.to_string(),
            }
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

    /// LLaVA-Bench review as `eval_gpt_review_bench.py` runs it: the pair
    /// `[reference (GPT-4) score, model score]`.
    pub fn review_llava_bench(
        &self,
        input: &LlavaBenchReviewInput,
    ) -> Result<[f64; 2], JudgeError> {
        let messages = [
            ChatMessage::system(LLAVA_BENCH_SYSTEM_PROMPT),
            ChatMessage::user(llava_bench_review_prompt(input)),
        ];
        let review = self.complete(&messages, LLAVA_BENCH_TEMPERATURE, LLAVA_BENCH_MAX_TOKENS)?;
        parse_review_scores(&review).ok_or_else(|| self.unparsable(review))
    }

    /// MM-Vet grade in [0, 1], as `mm-vet_evaluator.py` grades one run. An
    /// unreadable reply (or one without content) is asked again with the
    /// "Predict the correctness" suffix: temperatures 0.0, 0.0, 0.5, 1.0, 1.5.
    /// After five unreadable replies the error is returned; the official
    /// loop then makes a sixth call (at 2.0) whose reply it never reads and
    /// records 0.0, so that call is skipped here.
    pub fn grade_mm_vet(
        &self,
        question: &str,
        ground_truth: &str,
        prediction: &str,
    ) -> Result<f64, JudgeError> {
        const READ_REPLIES: u32 = 5;
        const TEMPERATURE_STEP: f64 = 0.5;
        let prompt = mm_vet_grader_prompt(question, ground_truth, prediction);
        let mut content = prompt.clone();
        let mut temperature = 0.0;
        let mut reply = String::new();
        for call in 1..=READ_REPLIES {
            match self.complete(
                &[ChatMessage::user(content.as_str())],
                temperature,
                MM_VET_MAX_TOKENS,
            ) {
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
    pub fn extract_mathvista_answer(
        &self,
        query: &str,
        response: &str,
    ) -> Result<String, JudgeError> {
        let prompt = mathvista_extraction_prompt(query, response);
        Ok(self
            .complete(&[ChatMessage::user(prompt)], 0.0, MATHVISTA_MAX_TOKENS)
            .map(|reply| python::strip(&reply).to_string())?)
    }
}

fn is_loopback_url(url: &str) -> bool {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

// The prompt texts below are the official ones, shipped as data under
// third_party/ (sources, commits and licences in the README files there).

// ---------------------------------------------------------------- LLaVA-Bench

/// The judge `eval_gpt_review_bench.py` calls.
pub const LLAVA_BENCH_JUDGE_MODEL: &str = "gpt-4-0314";
const LLAVA_BENCH_TEMPERATURE: f64 = 0.2;
/// The script's `--max-tokens` default.
const LLAVA_BENCH_MAX_TOKENS: u32 = 1024;

/// `eval_gpt_review_bench.py`'s system message.
pub const LLAVA_BENCH_SYSTEM_PROMPT: &str =
    include_str!("../../third_party/llava/review_system_prompt.txt");

/// An entry of LLaVA's `llava/eval/table/rule.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReviewRule {
    pub role: String,
    pub prompt: String,
}

static LLAVA_REVIEW_RULES: LazyLock<HashMap<String, ReviewRule>> = LazyLock::new(|| {
    serde_json::from_str(include_str!("../../third_party/llava/rule.json"))
        .expect("the shipped rule.json parses")
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
    let LlavaBenchReviewInput {
        rule: ReviewRule { role, prompt },
        context,
        question,
        reference_answer,
        model_answer,
    } = input;
    format!(
        "[Context]\n{context}\n\n[Question]\n{question}\n\n[{role} 1]\n{reference_answer}\n\n[End of {role} 1]\n\n[{role} 2]\n{model_answer}\n\n[End of {role} 2]\n\n[System]\n{prompt}\n\n"
    )
}

/// `parse_score`: the first line, commas read as spaces, must split on single
/// spaces into exactly two numbers.
pub fn parse_review_scores(review: &str) -> Option<[f64; 2]> {
    let first_line = review
        .split('\n')
        .next()
        .unwrap_or_default()
        .replace(',', " ");
    match first_line.split(' ').collect::<Vec<_>>()[..] {
        [first, second] => Some([parse_python_float(first)?, parse_python_float(second)?]),
        _ => None,
    }
}

// ---------------------------------------------------------------- MM-Vet

/// `mm-vet_evaluator.py`'s `--gpt_model` default.
pub const MM_VET_JUDGE_MODEL: &str = "gpt-4-0613";
const MM_VET_MAX_TOKENS: u32 = 3;

/// The few-shot grading table of `mm-vet_evaluator.py` (its `prompt`).
pub const MM_VET_GRADER_PROMPT: &str = include_str!("../../third_party/mm-vet/grader_prompt.txt");
/// Appended to the sample's row when a reply is not a score in [0, 1].
pub const MM_VET_RETRY_SUFFIX: &str = include_str!("../../third_party/mm-vet/retry_suffix.txt");

/// The few-shot table plus this sample's row with an empty last cell.
pub fn mm_vet_grader_prompt(question: &str, ground_truth: &str, prediction: &str) -> String {
    let ground_truth = ground_truth
        .replace("<AND>", " <AND> ")
        .replace("<OR>", " <OR> ");
    format!(
        "{MM_VET_GRADER_PROMPT}\n{}",
        [question, ground_truth.as_str(), prediction, ""].join(" | ")
    )
}

/// The first space-separated word of the reply as a number in [0, 1]. The
/// official range check lets `nan` through (NaN compares false); here it
/// counts as unreadable, so it cannot turn the averages into NaN.
pub fn parse_mm_vet_score(reply: &str) -> Option<f64> {
    let score = parse_python_float(reply.split(' ').next().unwrap_or_default())?;
    (0.0..=1.0).contains(&score).then_some(score)
}

// ---------------------------------------------------------------- MathVista

/// `extract_answer.py` takes its model from the environment; the README's
/// extractor is GPT-4, and the first release's `--llm_engine` default was this.
pub const MATHVISTA_JUDGE_MODEL: &str = "gpt-4-0613";
/// `GPT_Model`'s `max_tokens` default.
const MATHVISTA_MAX_TOKENS: u32 = 1024;

/// `demo_prompt` of `evaluation/prompts/ext_ans.py`.
const MATHVISTA_DEMO_PROMPT: &str = include_str!("../../third_party/mathvista/demo_prompt.txt");

/// `create_test_prompt`: the stripped few-shot demo, then the query and the response.
pub fn mathvista_extraction_prompt(query: &str, response: &str) -> String {
    format!(
        "{}\n\n{query}\n\n{response}\n\nExtracted answer: ",
        python::strip(MATHVISTA_DEMO_PROMPT)
    )
}

/// A loopback stub of a chat-completions server, shared by the tests of the eval modules.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Instant;

    /// A loopback HTTP server answering each connection with the next canned
    /// `(status, body)`; it stops after the last one or after 10 seconds.
    pub(crate) struct StubServer {
        pub(crate) url: String,
        request_bodies: Arc<Mutex<Vec<String>>>,
        thread: JoinHandle<()>,
    }

    impl StubServer {
        pub(crate) fn start(responses: Vec<(u16, String)>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let url = format!("http://{}/v1", listener.local_addr().unwrap());
            let request_bodies = Arc::new(Mutex::new(Vec::new()));
            let bodies = Arc::clone(&request_bodies);
            let thread = std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut responses = responses.into_iter();
                let mut next = responses.next();
                while let Some((status, body)) = &next {
                    if Instant::now() > deadline {
                        return;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).unwrap();
                            stream
                                .set_read_timeout(Some(Duration::from_secs(5)))
                                .unwrap();
                            bodies.lock().unwrap().push(read_request_body(&stream));
                            let mut stream = stream;
                            let head = format!(
                                "HTTP/1.1 {status} Stub\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            );
                            stream.write_all(head.as_bytes()).unwrap();
                            stream.write_all(body.as_bytes()).unwrap();
                            next = responses.next();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(e) => panic!("stub accept failed: {e}"),
                    }
                }
            });
            StubServer {
                url,
                request_bodies,
                thread,
            }
        }

        /// Waits for the server to finish and returns the request bodies it saw.
        pub(crate) fn finish(self) -> Vec<String> {
            self.thread.join().unwrap();
            Arc::try_unwrap(self.request_bodies)
                .unwrap()
                .into_inner()
                .unwrap()
        }
    }

    fn read_request_body(stream: &std::net::TcpStream) -> String {
        let mut reader = io::BufReader::new(stream);
        let mut content_length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body).unwrap();
        String::from_utf8(body).unwrap()
    }

    pub(crate) fn completion(content: &str) -> String {
        json!({ "choices": [{ "index": 0, "message": { "role": "assistant", "content": content } }] }).to_string()
    }

    /// A client for `url` with millisecond back-off, so retry tests run fast.
    pub(crate) fn test_client(url: &str, cache_path: Option<PathBuf>) -> JudgeClient {
        JudgeClient::new(JudgeConfig {
            url: url.to_string(),
            model: "judge-model".to_string(),
            api_key_env: "STIC_TEST_JUDGE_KEY_THAT_IS_NEVER_SET".to_string(),
            timeout: Duration::from_secs(5),
            max_attempts: 4,
            backoff_base: Duration::from_millis(1),
            cache_path,
        })
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{completion, test_client, StubServer};
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn endpoint_accepts_base_or_full_url() {
        let base = JudgeConfig {
            url: "http://127.0.0.1:8000/v1/".to_string(),
            ..JudgeConfig::default()
        };
        assert_eq!(base.endpoint(), "http://127.0.0.1:8000/v1/chat/completions");
        let full = JudgeConfig {
            url: "http://h/v1/chat/completions".to_string(),
            ..JudgeConfig::default()
        };
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
        assert_eq!(
            judge.complete(&messages, 0.2, 16).unwrap(),
            "8 9\nBoth answers are good."
        );
        let bodies = server.finish();
        assert_eq!(bodies.len(), 3);
        let sent: Value = serde_json::from_str(&bodies[2]).unwrap();
        assert_eq!(sent["model"], judge.config().model);
        assert_eq!(sent["messages"][0]["content"], "rate this");
        assert_eq!(sent["max_tokens"], 16);
        assert_eq!(
            judge.stats(),
            JudgeStats {
                http_requests: 3,
                retries: 2,
                ..JudgeStats::default()
            }
        );

        // The server is gone: a repeat must come from the cache, in this client and in a new one.
        assert_eq!(
            judge.complete(&messages, 0.2, 16).unwrap(),
            "8 9\nBoth answers are good."
        );
        assert_eq!(judge.stats().cache_hits, 1);
        let reopened = test_client(&server_url_that_refuses(), Some(cache_path));
        assert_eq!(
            reopened.complete(&messages, 0.2, 16).unwrap(),
            "8 9\nBoth answers are good."
        );
        assert_eq!(
            reopened.stats(),
            JudgeStats {
                cache_hits: 1,
                ..JudgeStats::default()
            }
        );
    }

    /// A loopback URL whose port was just released, so connecting is refused.
    fn server_url_that_refuses() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", listener.local_addr().unwrap())
    }

    #[test]
    fn transport_errors_are_retried_up_to_the_attempt_limit() {
        let judge = test_client(&server_url_that_refuses(), None);
        let error = judge
            .complete(&[ChatMessage::user("x")], 0.0, 3)
            .unwrap_err();
        assert!(matches!(error, JudgeError::Transport(_)), "{error}");
        assert_eq!(
            judge.stats(),
            JudgeStats {
                http_requests: 4,
                retries: 3,
                ..JudgeStats::default()
            }
        );
    }

    #[test]
    fn client_errors_are_not_retried() {
        let server = StubServer::start(vec![(401, "{\"error\":\"bad key\"}".to_string())]);
        let judge = test_client(&server.url, None);
        let error = judge
            .complete(&[ChatMessage::user("x")], 0.0, 3)
            .unwrap_err();
        assert!(
            matches!(error, JudgeError::Http { status: 401, .. }),
            "{error}"
        );
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
            let error = judge
                .complete(&[ChatMessage::user(prompt)], 0.0, 3)
                .unwrap_err();
            assert!(
                matches!(error, JudgeError::MalformedReply { .. }),
                "{error}"
            );
        }
        let input = LlavaBenchReviewInput {
            rule: llava_bench_rule("conv").unwrap(),
            context: "A cat.".to_string(),
            question: "What is it?".to_string(),
            reference_answer: "A cat.".to_string(),
            model_answer: "A dog.".to_string(),
        };
        let error = judge.review_llava_bench(&input).unwrap_err();
        assert!(
            matches!(error, JudgeError::UnparsableScore { .. }),
            "{error}"
        );
        server.finish();
        let stats = judge.stats();
        assert_eq!(
            (
                stats.malformed_replies,
                stats.unparsable_scores,
                stats.retries
            ),
            (2, 1, 0)
        );
    }

    #[test]
    fn cache_survives_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let messages = [ChatMessage::user("q")];
        let good = serde_json::to_string(&CacheLine {
            key: cache_key("judge-model", &messages, 0.0),
            reply: "0.7".to_string(),
        })
        .unwrap();
        std::fs::write(&path, format!("{good}\n{{\"key\":\"abc\",\"rep")).unwrap();
        let judge = test_client(&server_url_that_refuses(), Some(path.clone()));
        assert_eq!(judge.complete(&messages, 0.0, 3).unwrap(), "0.7");

        let server = StubServer::start(vec![(200, completion("0.2"))]);
        let judge = test_client(&server.url, Some(path.clone()));
        assert_eq!(
            judge
                .complete(&[ChatMessage::user("other")], 0.0, 3)
                .unwrap(),
            "0.2"
        );
        server.finish();
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(lines.len(), 3);
        assert!(
            serde_json::from_str::<CacheLine>(&lines[2]).is_ok(),
            "new record starts on its own line"
        );
    }

    #[test]
    fn cache_key_depends_on_model_messages_and_temperature() {
        let messages = [ChatMessage::user("q")];
        let key = cache_key("m", &messages, 0.0);
        assert_eq!(key.len(), 64);
        assert_eq!(key, cache_key("m", &messages, 0.0));
        assert_ne!(key, cache_key("other", &messages, 0.0));
        assert_ne!(key, cache_key("m", &messages, 0.5));
        assert_ne!(key, cache_key("m", &[ChatMessage::system("q")], 0.0));
    }

    fn sha256_hex(text: &str) -> String {
        Sha256::digest(text.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// The shipped texts are the official ones (third_party/*/README.md lists
    /// the same digests): a changed byte fails here.
    #[test]
    fn shipped_prompts_are_the_official_texts() {
        assert_eq!(
            LLAVA_BENCH_SYSTEM_PROMPT,
            "You are a helpful and precise assistant for checking the quality of the answer."
        );
        assert_eq!(
            sha256_hex(include_str!("../../third_party/llava/rule.json")),
            "dd7345a44ce9f7a24e51a30ee030cdab32346f9d08e3359c80545ff1312b1e07"
        );
        assert_eq!(
            sha256_hex(MM_VET_GRADER_PROMPT),
            "d1b3e0a5b4e72c888b77164489d705bba4dd149934fff564dfba6443d81afe3f"
        );
        assert_eq!(
            MM_VET_RETRY_SUFFIX,
            "\nPredict the correctness of the answer (digit): "
        );
        assert_eq!(
            sha256_hex(MATHVISTA_DEMO_PROMPT),
            "a231722ced09cbd1f3fd16630ab58bf487f12e2f46ea0b26d1f2f6b5c50fb17c"
        );
        // The few-shot demo's `\n` escapes are newlines in Python's string, and so in the prompt.
        assert!(MATHVISTA_DEMO_PROMPT.contains(
            "Question: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5\n"
        ));
        assert!(!MATHVISTA_DEMO_PROMPT.contains('\\'));
        assert!(MM_VET_GRADER_PROMPT.ends_with(
            "between the names of the countries and their actual physical characteristics. | 1.0\n"
        ));
    }

    #[test]
    fn llava_bench_rules_come_from_rule_json() {
        let conv = llava_bench_rule("conv").unwrap();
        assert_eq!(conv.role, "Assistant");
        assert!(conv.prompt.starts_with("We would like to request your feedback on the performance of two AI assistants in response to the user question displayed above. The user asks the question on observing an image. For your reference, the visual content in the image is represented with a few sentences describing the image. \nPlease rate the helpfulness"));
        assert!(conv.prompt.ends_with("ensuring that the order in which the responses were presented does not affect your judgment."));
        assert_eq!(llava_bench_rule("detail"), Some(conv));
        assert_eq!(llava_bench_rule("complex"), Some(conv));
        // Only the llava_bench_ entries: the unprefixed "conv" rule (COCO boxes) is another text.
        assert_ne!(LLAVA_REVIEW_RULES["conv"].prompt, conv.prompt);
        assert_eq!(llava_bench_rule("default"), None);
        assert_eq!(llava_bench_rule("ocr"), None);
    }

    #[test]
    fn llava_bench_review_sends_the_official_prompt_and_parses_scores() {
        let server = StubServer::start(vec![(
            200,
            completion("7 6\nAssistant 1 is more detailed."),
        )]);
        let judge = test_client(&server.url, None);
        let rule = llava_bench_rule("complex").unwrap();
        let input = LlavaBenchReviewInput {
            rule,
            context: "A red bus.\nIt is parked.".to_string(),
            question: "What color is the bus?".to_string(),
            reference_answer: "Red.".to_string(),
            model_answer: "It is red.".to_string(),
        };
        assert_eq!(judge.review_llava_bench(&input).unwrap(), [7.0, 6.0]);
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
    fn review_score_parsing_matches_parse_score() {
        assert_eq!(parse_review_scores("8 7\nexplanation"), Some([8.0, 7.0]));
        assert_eq!(parse_review_scores("8,7"), Some([8.0, 7.0]));
        assert_eq!(parse_review_scores("9.5 6"), Some([9.5, 6.0]));
        // ", " becomes two spaces, hence three fields: rejected as in the official script.
        assert_eq!(parse_review_scores("8, 7"), None);
        assert_eq!(parse_review_scores("Scores: 8 7"), None);
        assert_eq!(parse_review_scores("8"), None);
    }

    #[test]
    fn mm_vet_grading_retries_unreadable_replies_with_the_digit_suffix() {
        let server = StubServer::start(vec![
            (200, completion("The answer")),
            (200, completion("0.6")),
        ]);
        let judge = test_client(&server.url, None);
        assert_eq!(
            judge
                .grade_mm_vet("What is x?", "-1<AND>-5", "x = -1")
                .unwrap(),
            0.6
        );
        let bodies = server.finish();
        let first: Value = serde_json::from_str(&bodies[0]).unwrap();
        let second: Value = serde_json::from_str(&bodies[1]).unwrap();
        let first_prompt = first["messages"][0]["content"].as_str().unwrap();
        // `prompt + "\n" + " | ".join([question, answer with spaced <AND>/<OR>, prediction, ""])`.
        assert_eq!(
            first_prompt,
            format!("{MM_VET_GRADER_PROMPT}\nWhat is x? | -1 <AND> -5 | x = -1 | ")
        );
        assert_eq!(first["messages"].as_array().unwrap().len(), 1);
        assert_eq!(first["messages"][0]["role"], "user");
        assert_eq!(first["max_tokens"], 3);
        assert_eq!(
            second["messages"][0]["content"],
            format!("{first_prompt}\nPredict the correctness of the answer (digit): ")
        );
        assert_eq!(
            (
                first["temperature"].as_f64(),
                second["temperature"].as_f64()
            ),
            (Some(0.0), Some(0.0))
        );
    }

    #[test]
    fn mm_vet_reply_without_content_is_asked_again() {
        let no_content =
            json!({ "choices": [{ "message": { "role": "assistant", "content": null } }] }).to_string();
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
        assert!(
            matches!(error, JudgeError::UnparsableScore { .. }),
            "{error}"
        );
        let temperatures: Vec<f64> = server
            .finish()
            .iter()
            .map(|body| {
                serde_json::from_str::<Value>(body).unwrap()["temperature"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert_eq!(temperatures, [0.0, 0.0, 0.5, 1.0, 1.5]);
        assert_eq!(judge.stats().unparsable_scores, 1);
    }

    #[test]
    fn mm_vet_score_parsing() {
        assert_eq!(parse_mm_vet_score("0.5"), Some(0.5));
        assert_eq!(parse_mm_vet_score("1.0 totally"), Some(1.0));
        // `content.split(" ")[0].strip()`: the first field is stripped of other whitespace.
        assert_eq!(parse_mm_vet_score("0.8\n"), Some(0.8));
        assert_eq!(parse_mm_vet_score("0"), Some(0.0));
        assert_eq!(parse_mm_vet_score("0.5."), None);
        assert_eq!(parse_mm_vet_score("nan"), None);
        assert_eq!(parse_mm_vet_score("1.5"), None);
        assert_eq!(parse_mm_vet_score(" 0.5"), None); // first space-separated field is empty
        assert_eq!(parse_mm_vet_score("wrong"), None);
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
        assert_eq!(
            judge
                .extract_mathvista_answer("Question: How many?", "There are 3.")
                .unwrap(),
            "3"
        );
        let sent: Value = serde_json::from_str(&server.finish()[0]).unwrap();
        assert_eq!(sent["messages"][0]["content"], prompt);
        assert_eq!(sent["messages"][0]["role"], "user");
        assert_eq!(sent["temperature"], 0.0);
        assert_eq!(sent["max_tokens"], 1024);
    }
}
