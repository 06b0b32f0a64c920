//! Replies already paid for, keyed by [`cache_key`], mirrored in an append-only JSONL file that a rerun reads
//! back, so that an interrupted run does not pay for the same request twice.
use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ChatMessage;
use crate::error::Result;
use crate::eval::provenance::sha256_hex;
use crate::jobs::jsonl::{read_jsonl, ResumableJsonl};

/// The field of a cache line that [`ResumableJsonl`] keys it by.
const KEY_FIELD: &str = "key";

pub(super) struct ReplyCache {
    replies: HashMap<String, String>,
    file: ResumableJsonl,
}

#[derive(Serialize, Deserialize)]
pub(super) struct CacheLine {
    pub(super) key: String,
    pub(super) reply: String,
}

impl ReplyCache {
    /// Opens (or creates) the cache file as a job's output is opened: locked against a second writer, a torn last
    /// line (a run killed mid-write) cut off, every record synced to disk before the next.
    pub(super) fn open(path: &Path) -> Result<Self> {
        let mut file = ResumableJsonl::open(path, KEY_FIELD, &Value::Null)?;
        file.keep();
        let replies = read_jsonl::<CacheLine>(path)?.into_iter().map(|line| (line.key, line.reply)).collect();
        Ok(ReplyCache { replies, file })
    }

    pub(super) fn get(&self, key: &str) -> Option<&String> {
        self.replies.get(key)
    }

    pub(super) fn insert(&mut self, key: String, reply: String) -> Result<()> {
        // Two callers may have asked the same request at once: the first reply stays.
        if self.replies.contains_key(&key) {
            return Ok(());
        }
        let record = CacheLine { key, reply };
        self.file.append(&record)?;
        self.replies.insert(record.key, record.reply);
        Ok(())
    }
}

/// sha256 over the model, the messages, the temperature and, from the second on, the judge run: each run of a
/// repeated review (`--judge-runs`) is its own request, and run 1 keeps the key of a single run.
pub fn cache_key(model: &str, messages: &[ChatMessage], temperature: f64, run: u32) -> String {
    let mut identity = json!({ "model": model, "messages": messages, "temperature": temperature });
    if run > 1 {
        identity["run"] = run.into();
    }
    sha256_hex(identity.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{completion, server_url_that_refuses, test_client, StubServer};
    use super::*;
    use crate::eval::judge::{ChatMessage, JudgeClient, JudgeConfig, JudgeError};

    #[test]
    fn cache_survives_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let messages = [ChatMessage::user("q")];
        let good = serde_json::to_string(&CacheLine {
            key: cache_key("judge-model", &messages, 0.0, 1),
            reply: "0.7".to_string(),
        })
        .unwrap();
        std::fs::write(&path, format!("{good}\n{{\"key\":\"abc\",\"rep")).unwrap();
        let judge = test_client(&server_url_that_refuses(), Some(path.clone()));
        assert_eq!(judge.complete(&messages, 0.0, 3).unwrap(), "0.7");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{good}\n"), "the torn line is cut off");
        drop(judge);

        let server = StubServer::start(vec![(200, completion("0.2"))]);
        let judge = test_client(&server.url, Some(path.clone()));
        assert_eq!(judge.complete(&[ChatMessage::user("other")], 0.0, 3).unwrap(), "0.2");
        server.finish();
        let lines: Vec<String> = std::fs::read_to_string(&path).unwrap().lines().map(String::from).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], good);
        assert!(serde_json::from_str::<CacheLine>(&lines[1]).is_ok(), "new record starts on its own line");
    }

    #[test]
    fn a_cache_in_use_is_refused_to_a_second_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let first = test_client(&server_url_that_refuses(), Some(path.clone()));
        let config = JudgeConfig { cache_path: Some(path.clone()), ..first.config().clone() };
        let error = JudgeClient::new(config.clone()).err().expect("the cache is locked");
        assert!(matches!(error, JudgeError::Cache(_)), "{error}");
        assert!(error.to_string().contains("is being written by another process"), "{error}");
        drop(first);
        assert!(JudgeClient::new(config).is_ok());
    }

    #[test]
    fn cache_key_depends_on_model_messages_temperature_and_run() {
        let messages = [ChatMessage::user("q")];
        let key = cache_key("m", &messages, 0.0, 1);
        assert_eq!(key.len(), 64);
        assert_eq!(key, cache_key("m", &messages, 0.0, 1));
        assert_ne!(key, cache_key("other", &messages, 0.0, 1));
        assert_ne!(key, cache_key("m", &messages, 0.5, 1));
        assert_ne!(key, cache_key("m", &[ChatMessage::system("q")], 0.0, 1));
        assert_ne!(key, cache_key("m", &messages, 0.0, 2));
        assert_ne!(cache_key("m", &messages, 0.0, 2), cache_key("m", &messages, 0.0, 3));
        // Run 1 keeps the key of the caches written before judge runs existed.
        let single_run = json!({ "model": "m", "messages": messages, "temperature": 0.0 });
        assert_eq!(key, sha256_hex(single_run.to_string().as_bytes()));
    }
}
