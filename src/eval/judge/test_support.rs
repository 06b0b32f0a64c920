//! A loopback stub of a chat-completions server, shared by the tests of the eval modules.
use std::io::{self, BufRead, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{JudgeClient, JudgeConfig};

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
                        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
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
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                    Err(e) => panic!("stub accept failed: {e}"),
                }
            }
        });
        StubServer { url, request_bodies, thread }
    }

    /// Waits for the server to finish and returns the request bodies it saw.
    pub(crate) fn finish(self) -> Vec<String> {
        self.thread.join().unwrap();
        Arc::try_unwrap(self.request_bodies).unwrap().into_inner().unwrap()
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
        runs: 1,
    })
    .unwrap()
}

/// A loopback URL whose port was just released, so connecting is refused.
pub(crate) fn server_url_that_refuses() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/v1", listener.local_addr().unwrap())
}
