"""`stic eval` and `stic eval-score` end to end: every benchmark format on the tiny model (its answers are noise,
which is fine: the tests check the protocol, the files and the scores of hand-written predictions), DaR, --limit,
shards, resume after a kill, the official-grader files, the LLM judge against a loopback stub, and bad input."""
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pathlib import Path

import pyarrow.parquet as pq
import pytest

import eval_data
from conftest import STIC, run_stic, run_stic_json

BENCHMARKS = list(eval_data.BUILDERS)
TOKENS = ["--device", "cpu", "--max-new-tokens", "8"]
EVAL_TIMEOUT = 240
# The tiny model never stops early, so a DaR description costs its full 1024 tokens: keep DaR runs few.
DAR_TIMEOUT = 420


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    assert STIC.is_file(), f"{STIC} is missing: build it first (cargo build --release)"
    out = tmp_path_factory.mktemp("tiny") / "model"
    run_stic("init-tiny", "--output", out, timeout=120)
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def predictions(path):
    return {r["id"]: r["prediction"] for r in read_jsonl(path)}


def stic_eval(model, bench, output, *extra, check=True, timeout=EVAL_TIMEOUT):
    return run_stic("eval", "--model", model, "--benchmark", bench.name, "--data", bench.path, "--output", output,
                    *TOKENS, *extra, check=check, timeout=timeout)


def eval_score(bench_name, preds, data, *extra, check=True):
    return run_stic("eval-score", "--benchmark", bench_name, "--predictions", preds, "--data", data, *extra,
                    check=check, timeout=120)


def score_json(bench_name, preds, data, *extra):
    [summary] = run_stic_json("eval-score", "--benchmark", bench_name, "--predictions", preds, "--data", data, *extra)
    return summary


def write_predictions(path, pairs):
    path.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n" for i, p in pairs.items()))
    return path


def assert_clean_failure(proc, *needles):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "panicked" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in: {proc.stderr}"


def without_provenance(summary):
    return {k: v for k, v in summary.items() if k != "provenance"}


def check_predictions_file(path, bench, ids=None):
    ids = bench.ids if ids is None else ids
    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == ids
    for r in rows:
        assert set(r) == {"id", "prompt", "prediction"}, r
        assert isinstance(r["prediction"], str)
        assert r["prompt"] == bench.prompts[r["id"]], "the prompt of the LLaVA-1.5 evaluation script"
    return rows


@pytest.fixture(scope="session")
def straight_runs(tiny_model, tmp_path_factory):
    """One plain `stic eval` per benchmark, run on first use and shared: benchmark -> (Bench, output folder, proc)."""
    runs = {}

    def get(name):
        if name not in runs:
            root = tmp_path_factory.mktemp(f"straight-{name}")
            bench = eval_data.build(name, root / "data")
            proc = stic_eval(tiny_model, bench, root / "out")
            runs[name] = (bench, root / "out", proc)
        return runs[name]

    return get


# ---------------------------------------------------------------- a loopback stub of an OpenAI chat endpoint

def completion(content):
    return json.dumps({"id": "chatcmpl-stub", "object": "chat.completion", "model": "stub",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


class StubJudge:
    """Answers POSTs with the scripted (status, body) pairs first, then with `reply(request) -> content` wrapped as a
    chat completion (or, when `reply` returns a tuple, that raw (status, body)). Records every request."""

    def __init__(self, reply, script=()):
        self.requests = []
        self.script = list(script)
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # socket timeout: a stuck client cannot hold the server

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with stub.lock:
                    stub.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body.decode()})
                    scripted = stub.script.pop(0) if stub.script else None
                if scripted is None:
                    answer = reply(json.loads(body))
                    scripted = answer if isinstance(answer, tuple) else (200, completion(answer))
                status, text = scripted
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def count(self):
        with self.lock:
            return len(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def stub_judge():
    stubs = []

    def start(reply, script=()):
        stubs.append(StubJudge(reply, script))
        return stubs[-1]

    yield start
    for stub in stubs:
        stub.close()


def user_content(request):
    return request["messages"][-1]["content"]


# LLaVA-Bench reviews in the official format: first line "<GPT-4 score> <model score>" (a comma also separates).
LLAVA_BENCH_REVIEWS = {
    "What is flying in the sky?": "8 7\nAssistant 1 is more precise.",
    "Describe this photo in detail.": "9 6\nAssistant 2 misses details.",
    "Why might this man be ironing on a taxi?": "7,8\nAssistant 2 explains the stunt better.",
}


def llava_bench_reply(request):
    for question, review in LLAVA_BENCH_REVIEWS.items():
        if f"[Question]\n{question}\n" in user_content(request):
            return review
    raise AssertionError(f"unexpected review request: {user_content(request)[:200]}")


MM_VET_GRADES = {"What is the animal in the picture?": "0.3", "How many cups are there?": "1.0",
                 "What vehicle is this?": "0.0"}
# grades 0.3 (rec, know), 1.0 (ocr, math), 0.0 (rec): total 1.3 / 3 = 43.33 % -> 43.3 (one decimal, as the official
# table); rec (0.3 + 0.0) / 2 = 15.0 %
MM_VET_ACCURACY = 43.3 / 100
MM_VET_BY_CAPABILITY = {"know": 30.0, "math": 100.0, "ocr": 100.0, "rec": 15.0}


def mm_vet_reply(request):
    for question, grade in MM_VET_GRADES.items():
        if f"\n{question} | " in user_content(request):
            return grade
    raise AssertionError(f"unexpected grading request: {user_content(request)[-300:]}")


JUDGE_KEY = ["--judge-key-env", "STIC_TEST_STUB_JUDGE_KEY"]
JUDGE = ["--judge-model", "stub-judge", *JUDGE_KEY]

# The official texts, copied by hand from the sources (third_party/*/README.md names them): the system message of
# LLaVA's eval_gpt_review_bench.py and the "prompt" of rule.json's llava_bench_conv/detail/complex entries.
LLAVA_BENCH_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_BENCH_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "displayed above. The user asks the question on observing an image. For your reference, the visual content in the "
    "image is represented with a few sentences describing the image. \nPlease rate the helpfulness, relevance, "
    "accuracy, level of details of their responses. Each assistant receives an overall score on a scale of 1 to 10, "
    "where a higher score indicates better overall performance.\nPlease first output a single line containing only two "
    "values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space.\nIn the "
    "subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
    "ensuring that the order in which the responses were presented does not affect your judgment.")
# sha256 of MM-Vet's few-shot grader table (`prompt` of mm-vet_evaluator.py) and of MathVista's stripped few-shot
# extraction demo (`demo_prompt.strip()` of evaluation/prompts/ext_ans.py), computed from the official sources.
MM_VET_PROMPT_SHA256 = "d1b3e0a5b4e72c888b77164489d705bba4dd149934fff564dfba6443d81afe3f"
MATHVISTA_DEMO_SHA256 = "2c251ab9e219c5d7db855ad5a9ef44d5bdb10639244b8d28e3ee66a5bda3f71c"


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- stic eval, every benchmark

@pytest.mark.parametrize("name", BENCHMARKS)
def test_eval_end_to_end(straight_runs, name):
    bench, out, proc = straight_runs(name)
    check_predictions_file(out / "predictions.jsonl", bench)
    assert f"{len(bench.ids)} written, 0 already there, 0 skipped" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    [printed] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed == summary
    assert summary["benchmark"] == name
    assert summary["answered"] == summary["items"] == len(bench.ids)
    check_provenance(summary, bench, out)
    if name in ("llava-bench", "mm-vet"):
        assert set(summary) == {"benchmark", "answered", "items", "score", "note", "provenance"}
        assert summary["score"] is None
        assert "--judge-url" in summary["note"] and "official grader" in summary["note"]
        preds = predictions(out / "predictions.jsonl")
        if name == "llava-bench":
            grader_file = out / "llava_bench_answers.jsonl"
            rows = read_jsonl(grader_file)
            assert [r["question_id"] for r in rows] == [int(i) for i in bench.ids], "numeric ids as in questions.jsonl"
            for r in rows:
                assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(r)
                assert r["text"] == preds[str(r["question_id"])]
                assert r["prompt"] == bench.prompts[str(r["question_id"])]
        else:
            grader_file = out / "mm-vet_results.json"
            assert json.loads(grader_file.read_text()) == preds, "MM-Vet's grader reads {id: answer}"
        assert str(grader_file) in summary["note"]
    else:
        assert {"benchmark", "answered", "items", "name", "correct", "accuracy"} <= set(summary)
        assert 0.0 <= summary["accuracy"] <= 1.0
        # eval-score on the same predictions gives the same numbers
        assert without_provenance(score_json(name, out / "predictions.jsonl", bench.path)) == without_provenance(summary)


def check_provenance(summary, bench, out):
    """What produced the score, as lmms-eval records it: build, model, template, generation settings."""
    p = summary["provenance"]
    assert p["stic"]["version"] and (p["stic"]["git_commit"] is None or len(p["stic"]["git_commit"]) >= 40)
    assert p["benchmark"] == {"name": bench.name, "data": str(bench.path), "circular": False, "with_text_only": False}
    assert p["predictions_sha256"] == hashlib.sha256((out / "predictions.jsonl").read_bytes()).hexdigest()
    model = Path(p["model"]["path"])
    assert p["model"]["config_sha256"] == hashlib.sha256((model / "config.json").read_bytes()).hexdigest()
    assert p["adapter"] is None and p["template"] == "mistral_instruct" and p["profile"] is None
    assert p["generation"] == {"dtype": "f32", "max_new_tokens": 8, "temperature": 0.0, "dar": None}
    assert p["judge"] is None


def test_eval_limit(tiny_model, tmp_path):
    bench = eval_data.textvqa(tmp_path / "data")
    proc = stic_eval(tiny_model, bench, tmp_path / "out", "--limit", "2")
    check_predictions_file(tmp_path / "out" / "predictions.jsonl", bench, bench.ids[:2])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["answered"] == summary["items"] == 2
    assert "2 written, 0 already there" in proc.stderr


def test_eval_shards_cover_every_item_once(tiny_model, straight_runs, tmp_path):
    bench, straight_out, _ = straight_runs("chartqa")
    out = tmp_path / "out"
    for index in (0, 1):
        stic_eval(tiny_model, bench, out, "--shard", f"{index}/2", "--batch-size", "2")
    shard_files = [out / "predictions.shard-0-of-2.jsonl", out / "predictions.shard-1-of-2.jsonl"]
    rows = [read_jsonl(f) for f in shard_files]
    # shard i owns the positions p with p % 2 == i
    assert [r["id"] for r in rows[0]] == bench.ids[0::2]
    assert [r["id"] for r in rows[1]] == bench.ids[1::2]
    union = [r["id"] for shard in rows for r in shard]
    assert sorted(union) == sorted(bench.ids) and len(union) == len(set(union))
    assert not (out / "summary.json").exists(), "a shard is not scored alone"
    merged = out / "merged.jsonl"
    merged.write_text("".join(f.read_text() for f in shard_files))
    assert predictions(merged) == predictions(straight_out / "predictions.jsonl"), \
        "greedy answers do not depend on sharding or batching"
    summary = score_json("chartqa", merged, bench.path)
    assert summary["answered"] == summary["items"] == len(bench.ids)


@pytest.mark.parametrize("damage", ["delete_lines", "torn_last_line"])
def test_eval_resume_generates_only_missing_items(tiny_model, straight_runs, tmp_path, damage):
    bench, straight_out, _ = straight_runs("scienceqa")
    straight = predictions(straight_out / "predictions.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    path = out / "predictions.jsonl"
    lines = (straight_out / "predictions.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 3
    if damage == "delete_lines":
        path.write_text(lines[0] + lines[2])  # the middle item is missing
    else:
        path.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # killed while writing the last
    proc = stic_eval(tiny_model, bench, out)
    assert "1 written, 2 already there, 0 skipped" in proc.stderr
    rows = read_jsonl(path)
    assert len(rows) == 3 and sorted(r["id"] for r in rows) == sorted(bench.ids)
    assert predictions(path) == straight, "the resumed run ends with the straight run's predictions"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answered"] == summary["items"] == 3
    # nothing left to do: a third run generates nothing and changes nothing
    before = path.read_text()
    proc = stic_eval(tiny_model, bench, out)
    assert "0 written, 3 already there" in proc.stderr
    assert path.read_text() == before


# ---------------------------------------------------------------- describe and respond

def check_dar(out, bench, images):
    """`images`: item id -> the image it shows; one description per image, used by every item on it."""
    descriptions = read_jsonl(out / "descriptions.jsonl")
    assert len(descriptions) == len(set(images.values()))
    for d in descriptions:
        assert set(d) == {"key", "image_sha256", "description"} and isinstance(d["description"], str)
    used = {}
    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == bench.ids
    for r in rows:
        assert set(r) == {"id", "prompt", "prediction"}
        # the paper's DaR prompt: the description block, then the benchmark's own question prompt
        head, question = r["prompt"].split("\n\n", 1)
        assert head.startswith("Image description:\n") and question == bench.prompts[r["id"]]
        used.setdefault(images[r["id"]], set()).add(head.removeprefix("Image description:\n"))
    assert all(len(texts) == 1 for texts in used.values()), "items on one image share its description"
    assert {t for texts in used.values() for t in texts} == {d["description"] for d in descriptions}
    return descriptions


MMBENCH_IMAGES = {"0": "chelsea", "1": "rocket", "1000000": "chelsea"}  # the circular copy shows row 0's image


def test_eval_dar_mmbench(tiny_model, tmp_path):
    """DaR on MMBench (images decoded from the TSV): one description per image (the file's circular copy of row 0
    shares row 0's), used by every question on it."""
    bench = eval_data.mmbench(tmp_path / "data")
    out = tmp_path / "out"
    proc = stic_eval(tiny_model, bench, out, "--dar", "--description-max-new-tokens", "24", timeout=DAR_TIMEOUT)
    assert "descriptions.jsonl: 2 written" in proc.stderr
    check_dar(out, bench, MMBENCH_IMAGES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answered"] == summary["items"] == 3
    assert summary["provenance"]["generation"]["dar"] == {
        "description_prompt": "Detail the composition and subjects within the frame.",
        "description_max_new_tokens": 24, "image_blind": False}


def test_eval_dar_llava_bench_resumes_descriptions(tiny_model, tmp_path):
    """DaR on LLaVA-Bench after a run that was killed during the description pass: the description already written
    (edited here, to see that it is the one used) is kept, only the missing one is generated; the grader file is
    written as without DaR."""
    bench = eval_data.llava_bench(tmp_path / "data")
    out = tmp_path / "out"
    dar = ["--dar", "--description-max-new-tokens", "24"]
    proc = stic_eval(tiny_model, bench, out, *dar, timeout=DAR_TIMEOUT)
    assert "descriptions.jsonl: 2 written" in proc.stderr, "questions 0 and 1 share an image"
    first, second = read_jsonl(out / "descriptions.jsonl")
    kept = {**first, "description": "A white rocket rises on a column of smoke."}
    (out / "descriptions.jsonl").write_text(json.dumps(kept) + "\n")
    (out / "predictions.jsonl").unlink()
    proc = stic_eval(tiny_model, bench, out, *dar, timeout=DAR_TIMEOUT)
    assert "descriptions.jsonl: 1 written, 1 already there" in proc.stderr
    descriptions = check_dar(out, bench, {"0": "001", "1": "001", "2": "002"})
    assert descriptions == [kept, second]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score"] is None and summary["answered"] == 3
    grader = read_jsonl(out / "llava_bench_answers.jsonl")
    assert [r["prompt"] for r in grader] == [bench.prompts[i] for i in bench.ids], \
        "the grader sees the benchmark question, not the DaR prompt"


# ---------------------------------------------------------------- the LLM judge

def test_llava_bench_judge_retries_scores_and_caches(stub_judge, tmp_path, monkeypatch):
    monkeypatch.setenv("STIC_TEST_STUB_JUDGE_KEY", "sk-stub-key")
    bench = eval_data.llava_bench(tmp_path / "data")
    (tmp_path / "run").mkdir()
    preds = write_predictions(tmp_path / "run" / "predictions.jsonl",
                              {"0": "A rocket.", "1": "A launch pad with smoke.", "2": "For fun."})
    stub = stub_judge(llava_bench_reply, script=[(429, '{"error": {"message": "rate limited"}}'),
                                                 (500, "internal error")])
    summary = score_json("llava-bench", preds, bench.path, "--judge-url", stub.url, *JUDGE)

    # 3 reviews, the first after a 429 and a 500
    assert stub.count() == 5
    assert summary["judge"] == {"http_requests": 5, "retries": 2, "cache_hits": 0, "malformed_replies": 0,
                                "unparsable_scores": 0}
    for request in stub.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"].get("authorization") == "Bearer sk-stub-key"
    sent = [json.loads(r["body"]) for r in stub.requests]
    assert all(s["model"] == "stub-judge" and s["temperature"] == 0.2 for s in sent)
    assert sent[0] == sent[1] == sent[2], "a retry repeats the request"
    assert all(s["max_tokens"] == 1024 for s in sent)
    # eval_gpt_review_bench.py's layout: captions joined by newlines, GPT-4's answer first, the rule last
    assert sent[0]["messages"] == [
        {"role": "system", "content": LLAVA_BENCH_SYSTEM},
        {"role": "user", "content": "[Context]\nA rocket launch.\nSmoke billows below it.\n\n[Question]\nWhat is flying in "
                                    "the sky?\n\n[Assistant 1]\nA rocket is flying in the sky.\n\n[End of Assistant 1]\n\n"
                                    "[Assistant 2]\nA rocket.\n\n[End of Assistant 2]\n\n[System]\n"
                                    + LLAVA_BENCH_RULE + "\n\n"}]

    # reviews (GPT-4, model): conv (8, 7), detail (9, 6), complex (7, 8): means 8.0 and 7.0 -> 87.5 %
    assert summary["accuracy"] == 0.875
    assert summary["answered"] == summary["items"] == 3
    categories = summary["extra"]["categories"]
    assert categories["all"] == {"relative": 87.5, "reference": 80.0, "model": 70.0}
    assert categories["conv"]["relative"] == 87.5
    assert categories["detail"]["relative"] == 66.7
    assert categories["complex"]["relative"] == 114.3
    assert json.loads((preds.parent / "summary.json").read_text()) == summary

    # the same run again is served from the cache: the stub is not contacted
    again = score_json("llava-bench", preds, bench.path, "--judge-url", stub.url, *JUDGE)
    assert stub.count() == 5
    assert again["judge"] == {"http_requests": 0, "retries": 0, "cache_hits": 3, "malformed_replies": 0,
                              "unparsable_scores": 0}
    assert again["accuracy"] == summary["accuracy"] and again["extra"] == summary["extra"]

    # a changed answer is a new request; the others still come from the cache
    write_predictions(preds, {"0": "A rocket.", "1": "Smoke.", "2": "For fun."})
    third = score_json("llava-bench", preds, bench.path, "--judge-url", stub.url, *JUDGE)
    assert stub.count() == 6 and third["judge"]["cache_hits"] == 2 and third["judge"]["http_requests"] == 1


def test_llava_bench_judge_runs_are_asked_apart_and_summarised(stub_judge, tmp_path):
    """--judge-runs 3 reviews every answer three times (cached apart from run 1) and reports the spread."""
    bench = eval_data.llava_bench(tmp_path / "data")
    preds = write_predictions(tmp_path / "predictions.jsonl",
                              {"0": "A rocket.", "1": "A launch pad with smoke.", "2": "For fun."})
    # the n-th review of a question shifts the model's score by model_shift[n - 1]
    model_shift = [0, -1, 1]
    times_asked = {}

    def reply(request):
        reference, model = llava_bench_reply(request).split("\n")[0].replace(",", " ").split()
        content = user_content(request)
        times_asked[content] = times_asked.get(content, 0) + 1
        return f"{reference} {int(model) + model_shift[times_asked[content] - 1]}\nreviewed"

    stub = stub_judge(reply)
    judge = ["--judge-url", stub.url, *JUDGE]
    summary = score_json("llava-bench", preds, bench.path, *judge, "--judge-runs", "3")
    assert stub.count() == summary["judge"]["http_requests"] == 9
    sent = [r["body"] for r in stub.requests]
    assert sent[0:3] == sent[3:6] == sent[6:9], "every run asks the same requests, all answers run by run"
    # all (GPT-4, model) means: run 1 (8, 7) -> 87.5 %, run 2 (8, 6) -> 75.0 %, run 3 (8, 8) -> 100.0 %
    spread = summary["extra"]["judge_runs"]
    assert spread["runs"] == 3
    assert spread["relative"]["all"] == {"mean": 87.5, "std": 12.5, "min": 75.0, "max": 100.0,
                                         "per_run": [87.5, 75.0, 100.0]}
    # detail (9, 6), (9, 5), (9, 7): 66.7, 55.6, 77.8
    assert spread["relative"]["detail"]["per_run"] == [66.7, 55.6, 77.8]
    assert spread["relative"]["detail"]["std"] == pytest.approx(11.1)
    assert summary["extra"]["categories"]["all"] == {"relative": 87.5, "reference": 80.0, "model": 70.0}
    assert summary["accuracy"] == 0.875, "the headline is the mean over the runs"

    # run 1 is the single run's cache entry: without --judge-runs the summary is run 1's, from the cache
    single = score_json("llava-bench", preds, bench.path, *judge)
    assert stub.count() == 9 and single["judge"]["cache_hits"] == 3
    assert "judge_runs" not in single["extra"]
    assert single["extra"]["categories"]["detail"] == {"relative": 66.7, "reference": 90.0, "model": 60.0}
    again = score_json("llava-bench", preds, bench.path, *judge, "--judge-runs", "3")
    assert stub.count() == 9 and again["judge"]["cache_hits"] == 9 and again["extra"] == summary["extra"]


@pytest.mark.parametrize("args, needle", [
    (["--benchmark", "mm-vet", "--judge-url", "http://127.0.0.1:9/v1", "--judge-runs", "2"],
     "mm-vet is not reviewed in repeated judge runs"),
    (["--benchmark", "llava-bench", "--judge-url", "http://127.0.0.1:9/v1", "--judge-runs", "0"], "--judge-runs"),
    (["--benchmark", "llava-bench", "--judge-runs", "2"], "--judge-url"),
])
def test_judge_runs_refused_where_they_do_not_apply(tmp_path, args, needle):
    preds = write_predictions(tmp_path / "predictions.jsonl", {"v1_0": "a kitten"})
    proc = run_stic("eval-score", "--predictions", preds, "--data", tmp_path, *args, check=False, timeout=60)
    assert_clean_failure(proc, needle)


def test_llava_bench_unparsable_review_counts_as_failed(stub_judge, tmp_path):
    bench = eval_data.llava_bench(tmp_path / "data")
    preds = write_predictions(tmp_path / "predictions.jsonl", {"0": "a", "1": "b", "2": "c"})

    def reply(request):
        if "[Question]\nDescribe this photo in detail.\n" in user_content(request):
            return "Assistant 2 is better: 9 out of 10."
        return llava_bench_reply(request)

    stub = stub_judge(reply)
    summary = score_json("llava-bench", preds, bench.path, "--judge-url", stub.url, *JUDGE_KEY)
    assert {json.loads(r["body"])["model"] for r in stub.requests} == {"gpt-4-0314"}, \
        "without --judge-model, the judge eval_gpt_review_bench.py calls"
    # the unparsable review enters as (-1, -1), as in eval_gpt_review_bench.py: means 14/3 and 14/3 -> 100 %
    assert summary["judge"]["unparsable_scores"] == 1
    assert summary["extra"]["categories"]["all"]["relative"] == 100.0
    assert summary["accuracy"] == 1.0


def test_malformed_judge_reply_is_counted_not_fatal(stub_judge, tmp_path):
    bench = eval_data.llava_bench(tmp_path / "data")
    preds = write_predictions(tmp_path / "predictions.jsonl", {"0": "a", "1": "b", "2": "c"})

    def reply(request):
        if "[Question]\nDescribe this photo in detail.\n" in user_content(request):
            return 200, "this is not JSON"
        return llava_bench_reply(request)

    stub = stub_judge(reply)
    proc = eval_score("llava-bench", preds, bench.path, "--judge-url", stub.url, *JUDGE, check=False)
    assert proc.returncode == 0, proc.stderr
    [summary] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert summary["judge"]["malformed_replies"] == 1
    assert summary["answered"] == 3


def test_mm_vet_judge_grades(stub_judge, tmp_path):
    bench = eval_data.mm_vet(tmp_path / "data")
    preds = write_predictions(tmp_path / "predictions.jsonl",
                              {"v1_0": "a kitten", "v1_2": "one cup", "v1_10": "a plane"})
    stub = stub_judge(mm_vet_reply, script=[(429, "{}")])
    summary = score_json("mm-vet", preds, bench.path, "--judge-url", stub.url + "/chat/completions", *JUDGE)
    assert stub.count() == 4 and summary["judge"]["retries"] == 1
    sent = [json.loads(r["body"]) for r in stub.requests]
    assert all(s["max_tokens"] == 3 and s["temperature"] == 0.0 and len(s["messages"]) == 1 for s in sent)
    # the few-shot table, a newline, then the sample's row with <AND>/<OR> spaced out and an empty last cell
    table, row = user_content(sent[1]).rsplit("\n", 1)
    assert sha256(table) == MM_VET_PROMPT_SHA256
    assert row == "What is the animal in the picture? | cat <OR> kitten | a kitten | "
    assert summary["accuracy"] == MM_VET_ACCURACY
    assert summary["correct"] == pytest.approx(1.3, abs=1e-12)
    assert summary["extra"]["by_capability_percent"] == MM_VET_BY_CAPABILITY


def test_eval_mm_vet_with_judge(tiny_model, stub_judge, tmp_path):
    """`stic eval --judge-url` grades right after answering (the stub grades by question, whatever the answer)."""
    bench = eval_data.mm_vet(tmp_path / "data")
    stub = stub_judge(mm_vet_reply)
    out = tmp_path / "out"
    stic_eval(tiny_model, bench, out, "--judge-url", stub.url, *JUDGE_KEY)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == MM_VET_ACCURACY and summary["answered"] == summary["items"] == 3
    assert {json.loads(r["body"])["model"] for r in stub.requests} == {"gpt-4-0613"}, "mm-vet_evaluator.py's default"
    assert summary["judge"]["http_requests"] == stub.count() == 3
    assert not (out / "mm-vet_results.json").exists()
    assert (out / "judge_cache.jsonl").is_file()


def test_mathvista_judge_extracts_as_extract_answer(stub_judge, tmp_path):
    """With a judge, every response past extract_answer.py's direct checks is extracted by it (no rule first)."""
    bench = eval_data.mathvista(tmp_path / "data")
    # pid -> (response, the judge's extraction)
    judged = {"2": ("Luca needs $1.45.", "1.45"),                       # right
              "10": ("From 1 to 14 there are 13 objects.", " 14\n")}  # right; the last-number rule would read 13
    preds = write_predictions(tmp_path / "p.jsonl", {"1": "8/11",  # a choice's text: taken directly, not sent
                                                     **{pid: response for pid, (response, _) in judged.items()}})

    def reply(request):
        # create_test_prompt: demo_prompt.strip(), the query, the response, "Extracted answer: "
        demo, query, response, tail = user_content(request).rsplit("\n\n", 3)
        assert sha256(demo) == MATHVISTA_DEMO_SHA256
        assert tail == "Extracted answer: "
        [pid] = [pid for pid, (text, _) in judged.items() if text == response]
        assert query == eval_data.MATHVISTA[pid]["query"]
        return judged[pid][1]

    stub = stub_judge(reply)
    summary = score_json("mathvista", preds, bench.path, "--judge-url", stub.url, *JUDGE_KEY)
    assert stub.count() == 2
    for request in stub.requests:
        body = json.loads(request["body"])
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("gpt-4-0613", 0, 1024)
        assert [m["role"] for m in body["messages"]] == ["user"]
    assert summary["accuracy"] == 1.0 and summary["extra"]["llm_extraction_failures"] == 0
    # without a judge the rules stand in: the last number, 13, is wrong
    assert score_json("mathvista", preds, bench.path)["accuracy"] == 2 / 3


# ---------------------------------------------------------------- eval-score on hand-written predictions

def test_score_scienceqa(tmp_path):
    bench = eval_data.scienceqa(tmp_path / "data")
    preds = write_predictions(tmp_path / "p.jsonl", {
        "4": "A",                  # right
        "7": "The answer is B.",   # right (the official sentence form)
        "12": "coffee",            # unparsable -> wrong
    })
    summary = score_json("scienceqa", preds, bench.path)
    assert summary["accuracy"] == 2 / 3 and summary["correct"] == 2.0
    # without problems.json the answers come from the gpt turns: same verdicts
    (bench.path / "problems.json").unlink()
    assert score_json("scienceqa", preds, bench.path)["accuracy"] == 2 / 3
    # LLaVA's own answer files ({question_id, text}) are read too
    llava = tmp_path / "llava_answers.jsonl"
    llava.write_text("".join(json.dumps({"question_id": i, "prompt": "", "text": t, "answer_id": "x", "model_id": "m",
                                         "metadata": {}}) + "\n" for i, t in [("4", "B"), ("7", "B"), ("12", "C")]))
    assert score_json("scienceqa", llava, bench.path)["accuracy"] == 2 / 3


def test_score_textvqa(tmp_path):
    bench = eval_data.textvqa(tmp_path / "data")
    preds = write_predictions(tmp_path / "p.jsonl", {
        "34602": "Dakota.",    # 9 of 10 annotators: every leave-one-out subset has >= 3 matches -> 1
        "34603": "two",        # number words are digits -> 1
        "34610": "Coca-Cola",  # "coca cola" (3 of 10): subsets 2/3 (x3) and 1 (x7) -> 0.9
    })
    summary = score_json("textvqa", preds, bench.path)
    assert summary["accuracy"] == pytest.approx((1 + 1 + 0.9) / 3, abs=1e-12)
    assert summary["correct"] == pytest.approx(2.9, abs=1e-12)


def llava_textvqa_answers(path, rows):
    """LLaVA's answer-file lines: question_id is the image id, prompt the question file's text."""
    path.write_text("".join(json.dumps({"question_id": image_id, "prompt": prompt, "text": text, "answer_id": "x",
                                        "model_id": "llava", "metadata": {}}) + "\n" for image_id, prompt, text in rows))
    return path


def test_score_textvqa_llava_answer_file(tmp_path):
    """eval_textvqa.py joins LLaVA's answers on (image id, the prompt's question, lowercased): two questions share an
    image here, so the image id alone cannot tell them apart."""
    bench = eval_data.textvqa(tmp_path / "data")
    texts = ["Dakota.", "two", "Coca-Cola"]
    rows = [(image_id, prompt, text) for (image_id, _, prompt, *_), text in zip(eval_data.TEXTVQA, texts)]
    summary = score_json("textvqa", llava_textvqa_answers(tmp_path / "a.jsonl", rows[::-1]), bench.path)
    assert summary["answered"] == summary["items"] == 3 and summary["unmatched_predictions"] == 0
    assert summary["accuracy"] == pytest.approx((1 + 1 + 0.9) / 3, abs=1e-12)
    # prompt_processor lowercases the question, and reads the layout without OCR tokens ("question\nAnswer ...")
    camera, lenses, drink = rows
    recased = [(camera[0], camera[1].replace("what is the brand", "What Is The Brand"), "dakota"),
               (lenses[0], lenses[1], "3"),
               (drink[0], "What drink is advertised?\n" + eval_data.ANSWER_SHORT, "coke")]
    summary = score_json("textvqa", llava_textvqa_answers(tmp_path / "b.jsonl", recased), bench.path)
    # dakota: 1; "3" matches no annotator: 0; coke: 7 of 10 -> 1
    assert summary["answered"] == 3 and summary["accuracy"] == pytest.approx(2 / 3, abs=1e-12)


def test_score_textvqa_llava_answer_file_bad_lines(tmp_path):
    bench = eval_data.textvqa(tmp_path / "data")
    image_id, _, prompt, *_ = eval_data.TEXTVQA[0]
    # a question no annotation has on this image: not scored, and said so
    other = llava_textvqa_answers(tmp_path / "other.jsonl", [(image_id, prompt, "dakota"),
                                                             (image_id, "Who made it?\n" + eval_data.ANSWER_SHORT, "x")])
    proc = eval_score("textvqa", other, bench.path)
    [summary] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert summary["answered"] == 1 and summary["unmatched_predictions"] == 1
    assert "1 prediction(s) match no textvqa item" in proc.stderr
    # a prompt layout prompt_processor cannot read (the official script stops on it too)
    bad = llava_textvqa_answers(tmp_path / "bad.jsonl", [(image_id, prompt, "dakota"), (image_id, "one line", "x")])
    assert_clean_failure(eval_score("textvqa", bad, bench.path, check=False), "bad.jsonl line 2",
                         "unrecognised TextVQA prompt layout")


def test_score_chartqa(tmp_path):
    bench = eval_data.chartqa(tmp_path / "data")
    preds = write_predictions(tmp_path / "p.jsonl", {
        "human_0": "14.5",     # label 14: 3.6 % off -> right
        "augmented_0": "25",   # label 23.5: 6.4 % off -> wrong
        "augmented_1": "japan",  # exact, case-insensitive -> right
    })
    summary = score_json("chartqa", preds, bench.path)
    assert summary["accuracy"] == 2 / 3
    assert summary["extra"] == {"human_accuracy": 1.0, "augmented_accuracy": 0.5}


def test_score_mmbench_plain_and_circular(tmp_path):
    bench = eval_data.mmbench(tmp_path / "data")
    preds = write_predictions(tmp_path / "p.jsonl", {
        "0": "B",           # cat: right
        "1": "a launch",    # the option text picks A: right
        "1000000": "C",     # the file's circular copy of row 0 (answer A): wrong
    })
    summary = score_json("mmbench", preds, bench.path)
    # headline: question groups all of whose variants are right (row 1 only) -> 1/2; plain 2/3
    assert summary["accuracy"] == 0.5
    assert summary["extra"]["plain_accuracy"] == 2 / 3
    assert summary["extra"]["plain_correct"] == 2 and summary["extra"]["plain_total"] == 3
    # per category and per L2 category, as VLMEvalKit's report_acc: one count per question group, keys sorted
    assert summary["extra"]["category_accuracy"] == {
        "action_recognition": {"accuracy": 1.0, "correct": 1, "total": 1},
        "object_localization": {"accuracy": 0.0, "correct": 0, "total": 1},
    }
    l2 = summary["extra"]["l2_category_accuracy"]
    assert list(l2) == ["coarse_perception", "finegrained_perception (instance-level)"]
    assert [(v["correct"], v["total"]) for v in l2.values()] == [(1, 1), (0, 1)]

    # --circular: stic rotates the options itself (the file's own copies are skipped): row 0 -> 0, 1000000, 2000000;
    # row 1 -> 1, 1000001, 2000001, 3000001. Answering with the option text is right in every rotation.
    circular = write_predictions(tmp_path / "c.jsonl", {
        "0": "cat", "1000000": "cat", "2000000": "cat",
        "1": "a launch", "1000001": "a launch", "2000001": "a storm", "3000001": "a launch",
    })
    summary = score_json("mmbench", circular, bench.path, "--circular")
    assert summary["answered"] == 7
    assert summary["accuracy"] == 0.5
    assert summary["extra"]["plain_accuracy"] == 6 / 7
    # row 0's group is right now, row 1's wrong (2000001)
    assert {k: v["correct"] for k, v in summary["extra"]["category_accuracy"].items()} == \
        {"action_recognition": 0, "object_localization": 1}


def test_score_mathvista(tmp_path):
    bench = eval_data.mathvista(tmp_path / "data")
    preds = write_predictions(tmp_path / "p.jsonl", {
        "1": "The answer is (B) 8/11.",   # multi-choice, letter B -> "8/11": right
        "2": "Luca needs $1.45.",         # float, 2 decimals, last number 1.45: right
        "10": "There are 13 objects.",    # integer 13 != 14: wrong
    })
    summary = score_json("mathvista", preds, bench.path)
    assert summary["accuracy"] == 2 / 3 and summary["correct"] == 2.0


def test_score_without_judge_writes_grader_files(tmp_path):
    bench = eval_data.mm_vet(tmp_path / "data")
    preds = write_predictions(tmp_path / "p.jsonl", {"v1_0": "cat", "v1_2": "1", "v1_10": "rocket"})
    summary = score_json("mm-vet", preds, bench.path)
    assert summary["score"] is None and "official grader" in summary["note"]
    assert json.loads((tmp_path / "mm-vet_results.json").read_text()) == {"v1_0": "cat", "v1_2": "1",
                                                                         "v1_10": "rocket"}


# ---------------------------------------------------------------- the parquet releases on the hub

PARQUET = list(eval_data.PARQUET_BUILDERS)


@pytest.mark.parametrize("name", PARQUET)
def test_eval_parquet_release_matches_llava_layout(tiny_model, straight_runs, tmp_path, name):
    """The same questions from the hub's parquet release and from the LLaVA layout: the same prompts and images, so
    the same greedy answers, and the same scores from `stic eval` and `stic eval-score`."""
    llava, llava_out, _ = straight_runs(name)
    bench = eval_data.PARQUET_BUILDERS[name](tmp_path / "data")
    out = tmp_path / "out"
    stic_eval(tiny_model, bench, out)
    rows = check_predictions_file(out / "predictions.jsonl", bench)
    llava_rows = read_jsonl(llava_out / "predictions.jsonl")
    assert [(r["prompt"], r["prediction"]) for r in rows] == [(r["prompt"], r["prediction"]) for r in llava_rows]
    summary = without_provenance(json.loads((out / "summary.json").read_text()))
    assert summary == without_provenance(json.loads((llava_out / "summary.json").read_text()))
    assert without_provenance(score_json(name, out / "predictions.jsonl", bench.path)) == summary


# Hand-written answers, in item order, with known verdicts (see the test_score_* tests above).
PARQUET_SCORE_CASES = {
    "scienceqa": ["A", "The answer is B.", "coffee"],
    "chartqa": ["14.5", "25", "japan"],
    "mmbench": ["B", "a launch", "C"],
    "mathvista": ["The answer is (B) 8/11.", "Luca needs $1.45.", "There are 13 objects."],
}


@pytest.mark.parametrize("name", PARQUET)
def test_score_parquet_release_matches_llava_layout(tmp_path, name):
    llava = eval_data.build(name, tmp_path / "llava")
    bench = eval_data.PARQUET_BUILDERS[name](tmp_path / "parquet")
    answers = PARQUET_SCORE_CASES[name]
    expected = score_json(name, write_predictions(tmp_path / "llava.jsonl", dict(zip(llava.ids, answers))), llava.path)
    preds = write_predictions(tmp_path / "parquet.jsonl", dict(zip(bench.ids, answers)))
    assert without_provenance(score_json(name, preds, bench.path)) == without_provenance(expected)
    assert expected["answered"] == 3 and 0 < expected["accuracy"] < 1


def test_score_mmbench_parquet_circular_and_integer_index(tmp_path):
    """--circular rotates the parquet rows as it rotates the TSV's; lmms-lab/MMBench_EN's layout (data/, an int64
    index) reads like lmms-lab/MMBench's."""
    llava = eval_data.mmbench(tmp_path / "llava")
    releases = [eval_data.mmbench_parquet(tmp_path / "en"),
                eval_data.mmbench_parquet(tmp_path / "mmbench_en", integer_index=True)]
    circular = write_predictions(tmp_path / "c.jsonl", {
        "0": "cat", "1000000": "cat", "2000000": "dog",
        "1": "a launch", "1000001": "a launch", "2000001": "a launch", "3000001": "a launch",
    })
    expected = score_json("mmbench", circular, llava.path, "--circular")
    assert expected["accuracy"] == 0.5 and expected["answered"] == 7
    # the release's `L2-category` column reads as the TSV's `l2-category`
    assert len(expected["extra"]["l2_category_accuracy"]) == 2
    plain = write_predictions(tmp_path / "p.jsonl", dict(zip(llava.ids, PARQUET_SCORE_CASES["mmbench"])))
    for bench in releases:
        assert without_provenance(score_json("mmbench", circular, bench.path, "--circular")) == without_provenance(expected)
        assert without_provenance(score_json("mmbench", plain, bench.path)) == \
            without_provenance(score_json("mmbench", plain, llava.path))


def test_llava_layout_is_read_before_the_parquet_release(tmp_path):
    bench = eval_data.chartqa(tmp_path / "data")
    (bench.path / "data").mkdir()
    (bench.path / "data" / "test-00000-of-00001.parquet").write_bytes(b"not read")
    preds = write_predictions(tmp_path / "p.jsonl", dict(zip(bench.ids, PARQUET_SCORE_CASES["chartqa"])))
    assert score_json("chartqa", preds, bench.path)["accuracy"] == 2 / 3


# The LLaVA layout's main file and the release's shards, which the missing-data error names.
LAYOUTS = {
    "scienceqa": ("llava_test_CQM-A.json", "derek-thomas/ScienceQA", "data/test-*.parquet"),
    "chartqa": ("test_human.json", "HuggingFaceM4/ChartQA", "data/test-*.parquet"),
    "mmbench": ("mmbench_dev_20230712.tsv", "lmms-lab/MMBench", "en/dev-*.parquet"),
    "mathvista": ("testmini.json", "AI4Math/MathVista", "data/testmini-*.parquet"),
}


@pytest.mark.parametrize("name", PARQUET)
def test_missing_data_names_both_layouts(tmp_path, name):
    (tmp_path / "data").mkdir()
    preds = write_predictions(tmp_path / "p.jsonl", {"x": "y"})
    assert_clean_failure(eval_score(name, preds, tmp_path / "data", check=False), *LAYOUTS[name])


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _without_query(path):
    pq.write_table(pq.read_table(path).drop(["query"]), path)


@pytest.mark.parametrize("damage, message", [
    (_truncate, "not a readable parquet file"),
    (lambda path: path.write_bytes(b"<html>rate limited</html>"), "not a readable parquet file"),
    (_without_query, "row 0: missing field `query`"),
])
def test_bad_parquet_is_a_clean_error(tiny_model, tmp_path, damage, message):
    bench = eval_data.chartqa_parquet(tmp_path / "data")
    shard = bench.path / bench.removable
    damage(shard)
    assert_clean_failure(stic_eval(tiny_model, bench, tmp_path / "out", check=False, timeout=60), str(shard), message)
    preds = write_predictions(tmp_path / "p.jsonl", {i: "x" for i in bench.ids})
    assert_clean_failure(eval_score("chartqa", preds, bench.path, check=False), str(shard), message)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", BENCHMARKS)
def test_missing_benchmark_file_is_named(tiny_model, tmp_path, name):
    bench = eval_data.build(name, tmp_path / "data")
    (bench.path / bench.removable).unlink()
    proc = stic_eval(tiny_model, bench, tmp_path / "out", check=False, timeout=60)
    assert_clean_failure(proc, bench.removable)
    preds = write_predictions(tmp_path / "p.jsonl", {i: "x" for i in bench.ids})
    assert_clean_failure(eval_score(name, preds, bench.path, check=False), bench.removable)


def test_missing_image_folder_is_named(tiny_model, tmp_path):
    bench = eval_data.mm_vet(tmp_path / "data")
    shutil.rmtree(bench.path / "images")
    assert_clean_failure(stic_eval(tiny_model, bench, tmp_path / "out", check=False, timeout=60), "images", "mm-vet.zip")


def test_unknown_benchmark(tiny_model, tmp_path):
    proc = run_stic("eval", "--model", tiny_model, "--benchmark", "vqav2", "--data", tmp_path, "--output",
                    tmp_path / "out", "--device", "cpu", check=False, timeout=60)
    assert_clean_failure(proc, "vqav2", "mm-vet")
    preds = write_predictions(tmp_path / "p.jsonl", {"1": "x"})
    assert_clean_failure(eval_score("vqav2", preds, tmp_path, check=False), "vqav2")


def test_bad_prediction_file(tmp_path):
    bench = eval_data.scienceqa(tmp_path / "data")
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "4", "prediction": "A"}) + "\n" + json.dumps({"id": "7"}) + "\n")
    assert_clean_failure(eval_score("scienceqa", preds, bench.path, check=False), "p.jsonl", "line 2")
