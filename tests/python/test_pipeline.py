"""The STIC pipeline commands end to end on the tiny random model: `stic prefs`, `prefs-merge`, `train-dpo`,
`describe`, `infuse`, `train-sft`. Output schemas, resume after a kill, shards, batching, and bad input.

The tiny model's text is noise; what is checked is the plumbing: which records are written, in which order, with
which prompts, and that reruns, shards and batch sizes give exactly the same bytes.
"""
import csv
import fcntl
import json
import math
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import IMAGES, ROOT, STIC, official_pref_to_sft, run_stic

DATA_DIR = Path(__file__).parent / "data"
SAMPLE = DATA_DIR / "llava_sample.json"
SAMPLE_INFUSED = DATA_DIR / "llava_sample_infused.json"
PROMPTS = json.loads((ROOT / "third_party" / "stic" / "prompts.json").read_text())
SEED = 42
GEN = ["--device", "cpu", "--seed", str(SEED)]
MAX_NEW_TOKENS = 16
TIMEOUT = 300  # seconds for any one command
ALL_IMAGES = sorted(p.name for p in IMAGES.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
SFT_LOG_COLUMNS = ["step", "loss", "scored_tokens", "grad_norm", "lr", "tokens_per_s"]


def stic(*args, check=True, timeout=TIMEOUT):
    return run_stic(*args, check=check, timeout=timeout)


def assert_clean_failure(proc, *needles):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "panicked" not in proc.stderr and "RUST_BACKTRACE" not in proc.stderr, proc.stderr
    for needle in needles:
        assert str(needle) in proc.stderr, f"{needle!r} not in: {proc.stderr}"


def prefs(model, output, *extra, image_dir=IMAGES, max_new_tokens=MAX_NEW_TOKENS, check=True):
    return stic("prefs", "--model", model, "--image-dir", image_dir, "--output", output, *GEN,
                "--max-new-tokens", max_new_tokens, *extra, check=check)


def describe(model, output, *extra, data=SAMPLE, adapter=None, max_new_tokens=MAX_NEW_TOKENS, check=True):
    adapter_args = ["--adapter", adapter] if adapter else []
    return stic("describe", "--model", model, *adapter_args, "--data", data, "--image-dir", IMAGES,
                "--output", output, *GEN, "--max-new-tokens", max_new_tokens, *extra, check=check)


def read_jsonl(path):
    data = Path(path).read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} ends in a torn line: {data[-80:]!r}"
    return [json.loads(line) for line in data.decode().splitlines()]


def summary_counts(stderr):
    """(written, already there, skipped) from the job's summary line."""
    for line in stderr.splitlines():
        if " written, " in line and " already there, " in line:
            tail = line.rsplit(": ", 1)[1]
            w, a, s = (int(part.split()[0]) for part in tail.split(", "))
            return w, a, s
    raise AssertionError(f"no summary line in: {stderr}")


# ---------------------------------------------------------------- session fixtures: one pipeline run, shared

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    stic("init-tiny", "--output", out, timeout=120)
    return out


@pytest.fixture(scope="session")
def prefs_baseline(tiny, tmp_path_factory):
    """An uninterrupted, unsharded `stic prefs --batch-size 1` on the 8 sample images."""
    out = tmp_path_factory.mktemp("prefs") / "straight.jsonl"
    proc = prefs(tiny, out, "--batch-size", "1")
    assert summary_counts(proc.stderr) == (len(ALL_IMAGES), 0, 0), proc.stderr
    return out


@pytest.fixture(scope="session")
def stage1(tiny, prefs_baseline, tmp_path_factory):
    """A stage-1 adapter trained by `stic train-dpo` on the prefs output (a large lr so that it changes outputs)."""
    out = tmp_path_factory.mktemp("stage1") / "adapter"
    stic("train-dpo", "--model", tiny, "--data", prefs_baseline, "--image-dir", IMAGES, "--output", out,
         "--max-steps", "2", "--lora-r", "4", "--max-length", "4096", "--device", "cpu", "--grad-accum", "1",
         "--gradient-checkpointing", "false", "--lr", "1e-2", "--projector-lr", "1e-2")
    for name in ["adapter_config.json", "adapter_model.safetensors", "train_log.csv"]:
        assert (out / name).is_file(), name
    return out


@pytest.fixture(scope="session")
def described(tiny, stage1, tmp_path_factory):
    """An uninterrupted `stic describe` with the stage-1 adapter on the LLaVA sample."""
    out = tmp_path_factory.mktemp("describe") / "straight.jsonl"
    proc = describe(tiny, out, adapter=stage1)
    assert summary_counts(proc.stderr) == (4, 0, 0), proc.stderr
    return out


@pytest.fixture(scope="session")
def infused(described, tmp_path_factory):
    out = tmp_path_factory.mktemp("infuse") / "infused.json"
    proc = stic("infuse", "--data", SAMPLE, "--descriptions", described, "--output", out)
    assert "4 entries infused, 1 without an image left as they were, 0 without a description" in proc.stderr, proc.stderr
    return out


# ---------------------------------------------------------------- stage 1: stic prefs

def test_prefs_schema(tiny, prefs_baseline):
    records = read_jsonl(prefs_baseline)
    assert [r["image"] for r in records] == ALL_IMAGES, "one line per image, in the (sorted) folder order"
    keys = {"image", "image_corruption", "hallu_prompt", "chosen", "rejected", "corruption", "seed", "model"}
    for r in records:
        assert set(r) == keys, r.keys()
        assert isinstance(r["image_corruption"], bool)
        assert isinstance(r["hallu_prompt"], str)
        assert r["seed"] == SEED and r["model"] == str(tiny)
        for side in ("chosen", "rejected"):
            turns = r[side]
            assert [t["role"] for t in turns] == ["user", "assistant"], turns
            assert all(set(t) == {"role", "content"} and isinstance(t["content"], str) for t in turns), turns
        user = r["chosen"][0]["content"]
        assert r["rejected"][0]["content"] == user
        assert user in PROMPTS["description_prompts"], user
        if r["image_corruption"]:
            assert r["corruption"] in {"resize20", "color_jitter"} and r["hallu_prompt"] == "", r
        else:
            assert r["corruption"] is None and r["hallu_prompt"] in PROMPTS["hallucination_prompts"], r
    # with seed 42 both branches of the dispreferred response occur among the 8 images
    branches = {r["image_corruption"] for r in records}
    assert branches == {True, False}, [(r["image"], r["corruption"], r["hallu_prompt"][:20]) for r in records]


def test_prefs_batch_size_does_not_change_the_records(tiny, prefs_baseline, tmp_path):
    out = tmp_path / "bs4.jsonl"
    prefs(tiny, out, "--batch-size", "4")
    assert out.read_bytes() == prefs_baseline.read_bytes()


def test_prefs_shards_merged_equal_the_unsharded_run(tiny, prefs_baseline, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    prefs(tiny, b, "--shard", "1/2", "--batch-size", "2")
    prefs(tiny, a, "--shard", "0/2", "--batch-size", "3")
    assert [r["image"] for r in read_jsonl(a)] == ALL_IMAGES[0::2]
    assert [r["image"] for r in read_jsonl(b)] == ALL_IMAGES[1::2]
    merged = tmp_path / "m.jsonl"
    proc = stic("prefs-merge", "--inputs", a, b, "--image-dir", IMAGES, "--output", merged)
    assert f"{len(ALL_IMAGES)} records from 2 shards" in proc.stderr, proc.stderr
    assert merged.read_bytes() == prefs_baseline.read_bytes()

    # One shard alone is incomplete: refused, nothing written.
    lone = tmp_path / "lone.jsonl"
    proc = stic("prefs-merge", "--inputs", a, "--image-dir", IMAGES, "--output", lone, check=False)
    assert_clean_failure(proc, "4 missing", ALL_IMAGES[1])
    assert not lone.exists()


def _start_prefs(model, output, log):
    args = [str(STIC), "prefs", "--model", str(model), "--image-dir", str(IMAGES), "--output", str(output), *GEN,
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "1"]
    # SIGINT as a terminal sends it, even when the suite runs where it is ignored (a background job of a shell
    # without job control inherits SIG_IGN, and `prefs` would then never see the ctrl_c case's signal).
    return subprocess.Popen(args, stdout=log, stderr=log, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt_mid_run(model, output, log_path, sig, rng):
    """Starts prefs, waits for its first line, sends `sig` after a random delay; retries (shorter delays) when the
    run finished before the signal. Returns the delay used."""
    for attempt in range(4):
        if output.exists():
            output.unlink()
        delay = rng.uniform(0.0, 3.0) / (2 ** attempt)
        with open(log_path, "w") as log:
            proc = _start_prefs(model, output, log)
            try:
                deadline = time.monotonic() + TIMEOUT
                while not (output.exists() and b"\n" in output.read_bytes()):
                    assert proc.poll() is None, f"prefs ended before its first line:\n{Path(log_path).read_text()}"
                    assert time.monotonic() < deadline, "no line within the timeout"
                    time.sleep(0.02)
                time.sleep(delay)
                finished_first = proc.poll() is not None
                if not finished_first:
                    proc.send_signal(sig)
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=60)
        lines = output.read_bytes().count(b"\n")
        if not finished_first and lines < len(ALL_IMAGES):
            assert proc.returncode != 0, f"prefs exited 0 after signal {sig}"
            return delay
    pytest.fail("prefs always finished before the signal could be sent")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl_c"])
def test_prefs_resumes_after_an_interruption_to_the_same_file(tiny, prefs_baseline, tmp_path, sig):
    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    out = tmp_path / "resumed.jsonl"
    delay = _interrupt_mid_run(tiny, out, tmp_path / "first.log", sig, rng)
    why = f"(random seed {seed}, signal after {delay:.2f} s)"

    expected = prefs_baseline.read_bytes()
    partial = out.read_bytes()
    complete = partial[: partial.rfind(b"\n") + 1]
    assert expected.startswith(complete), f"the interrupted run wrote lines an uninterrupted run does not {why}"
    done = complete.count(b"\n")
    assert 1 <= done < len(ALL_IMAGES), f"{done} lines {why}"
    if partial == complete:
        # Also leave a torn write behind (the next line, cut in the middle), as a crash inside write() would.
        next_line = expected[len(complete):].split(b"\n", 1)[0]
        with open(out, "ab") as f:
            f.write(next_line[: len(next_line) // 2])

    proc = prefs(tiny, out, "--batch-size", "1")
    assert summary_counts(proc.stderr) == (len(ALL_IMAGES) - done, done, 0), f"{proc.stderr} {why}"
    assert out.read_bytes() == expected, f"the resumed file differs from an uninterrupted run {why}"
    read_jsonl(out)  # no torn line

    # A rerun of a finished job writes nothing.
    proc = prefs(tiny, out, "--batch-size", "1")
    assert summary_counts(proc.stderr) == (0, len(ALL_IMAGES), 0), proc.stderr
    assert out.read_bytes() == expected


def test_prefs_refuses_an_output_another_process_writes(tiny, prefs_baseline, tmp_path):
    out = tmp_path / "locked.jsonl"
    head = b"".join(prefs_baseline.read_bytes().splitlines(keepends=True)[:2])
    out.write_bytes(head)
    with open(out, "ab") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = prefs(tiny, out, check=False)
    assert_clean_failure(proc, "being written by another process")
    assert out.read_bytes() == head


# ---------------------------------------------------------------- stage 2: describe, infuse, train-sft

def sample_entries():
    return json.loads(SAMPLE.read_text())


def test_describe_schema(described):
    records = read_jsonl(described)
    with_images = [e for e in sample_entries() if "image" in e]
    assert [r["id"] for r in records] == [e["id"] for e in with_images]
    for r, e in zip(records, with_images):
        assert set(r) == {"id", "image", "prompt", "description"}, r.keys()
        assert r["image"] == e["image"]
        assert r["prompt"] in PROMPTS["description_prompts"], r["prompt"]
        assert isinstance(r["description"], str)


def test_describe_uses_the_adapter(tiny, described, tmp_path):
    plain = tmp_path / "plain.jsonl"
    describe(tiny, plain)
    with_adapter, without = read_jsonl(described), read_jsonl(plain)
    assert [r["prompt"] for r in with_adapter] == [r["prompt"] for r in without]
    assert [r["description"] for r in with_adapter] != [r["description"] for r in without], \
        "the stage-1 adapter changed no description"


def test_describe_resumes_to_the_same_file(tiny, stage1, described, tmp_path):
    out = tmp_path / "resumed.jsonl"
    proc = describe(tiny, out, "--limit", "2", "--batch-size", "1", adapter=stage1)
    assert summary_counts(proc.stderr) == (2, 0, 0), proc.stderr
    expected = described.read_bytes()
    first_two = b"".join(expected.splitlines(keepends=True)[:2])
    assert out.read_bytes() == first_two
    third = expected.splitlines(keepends=True)[2]
    with open(out, "ab") as f:  # a torn write of the third record
        f.write(third[: len(third) // 3])
    proc = describe(tiny, out, "--batch-size", "3", adapter=stage1)
    assert summary_counts(proc.stderr) == (2, 2, 0), proc.stderr
    assert out.read_bytes() == expected


def test_describe_shards_merged_equal_the_unsharded_run(tiny, stage1, described, tmp_path):
    shards = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    for i, path in enumerate(shards):
        describe(tiny, path, "--shard", f"{i}/2", adapter=stage1)
    merged = tmp_path / "m.jsonl"
    stic("prefs-merge", "--inputs", *shards, "--data", SAMPLE, "--output", merged)
    assert merged.read_bytes() == described.read_bytes()


def test_infuse_matches_the_expected_file(tmp_path):
    descriptions = [
        {"id": "000000033471", "image": "chelsea.png", "prompt": "p", "description": "A tabby cat looks to the left."},
        {"id": "ocr_17", "image": "coffee.png", "description": "A cup of coffee on a saucer.\nA spoon lies beside it."},
        {"id": 42, "description": "not used: the entry has no image"},
        {"id": "vg_5", "image": "camera.png", "description": "A man with a camera \u2014 \u00abs\u00fcr le tr\u00e9pied\u00bb, \"quoted\"."},
        # gqa_9 has none
    ]
    path = tmp_path / "descriptions.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in descriptions))
    out = tmp_path / "infused.json"
    proc = stic("infuse", "--data", SAMPLE, "--descriptions", path, "--output", out)
    assert json.loads(out.read_text()) == json.loads(SAMPLE_INFUSED.read_text())
    assert "3 entries infused, 1 without an image left as they were, 1 without a description: gqa_9" in proc.stderr, \
        proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["descriptions.jsonl", "infused.json"], "temporary files left"


def expected_infusion(entries, descriptions):
    by_id = {str(d["id"]): d["description"] for d in descriptions}
    out = json.loads(json.dumps(entries))
    for entry in out:
        if "image" not in entry or str(entry["id"]) not in by_id:
            continue
        turn = next(t for t in entry["conversations"] if t["from"] == "human")
        block = f"Image description:\n{by_id[str(entry['id'])]}\n\n"
        v = turn["value"]
        turn["value"] = "<image>\n" + block + v[len("<image>\n"):] if v.startswith("<image>\n") else block + v
    return out


def test_infuse_of_the_described_sample(described, infused):
    assert json.loads(infused.read_text()) == expected_infusion(sample_entries(), read_jsonl(described))


def test_train_sft_from_the_stage1_adapter(tiny, stage1, infused, tmp_path):
    out = tmp_path / "sft"
    stic("train-sft", "--model", tiny, "--init-adapter", stage1, "--data", infused, "--image-dir", IMAGES,
         "--output", out, "--max-steps", "2", "--lora-r", "4", "--max-length", "4096", "--device", "cpu",
         "--batch-size", "2", "--grad-accum", "1", "--gradient-checkpointing", "false")
    for name in ["adapter_config.json", "adapter_model.safetensors", "train_log.csv"]:
        assert (out / name).is_file(), name
    with open(out / "train_log.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == SFT_LOG_COLUMNS
        rows = list(reader)
    assert [r["step"] for r in rows] == ["1", "2"]
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r["loss"]) > 0, r
        assert float(r["scored_tokens"]) > 0 and math.isfinite(float(r["grad_norm"])), r
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4  # the stage-1 adapter's rank
    before, after = load_file(stage1 / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any((before[k] - after[k]).abs().max().item() > 0 for k in before), "SFT changed no weight"


def test_sft_loss_goes_down(tiny, tmp_path):
    data = tmp_path / "two.json"
    data.write_text(json.dumps(sample_entries()[:2]))
    out = tmp_path / "sft"
    stic("train-sft", "--model", tiny, "--data", data, "--image-dir", IMAGES, "--output", out,
         "--lr", "5e-3", "--projector-lr", "1e-3", "--max-steps", "20", "--lora-r", "4", "--lora-alpha", "8",
         "--lora-dropout", "0", "--batch-size", "2", "--grad-accum", "1", "--max-length", "4096", "--device", "cpu",
         "--gradient-checkpointing", "false")
    with open(out / "train_log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    # The tiny model's logits are nearly flat (loss ~ ln 32002 = 10.37) and its 64-wide hidden state bounds how far
    # they can move, so a clear drop here is a few tenths of a nat.
    assert losses[-1] < losses[0] - 0.25, losses
    assert max(losses[-5:]) < min(losses[:3]), losses


def test_prefs_to_sft_writes_the_official_conversion_and_trains(tiny, prefs_baseline, tmp_path):
    pairs = read_jsonl(prefs_baseline)
    # the official flow: generate_pref.py's JSONL, then convert_jsonl_to_json.py's list; a COCO name listed twice
    coco = dict(pairs[0], image="COCO_train2014_000000000009.jpg")
    # the official converter reads the chosen side alone: an empty or absent rejected side converts too
    empty_rejected = dict(pairs[1], rejected=[pairs[1]["rejected"][0], {"role": "assistant", "content": ""}])
    no_rejected = {k: v for k, v in pairs[1].items() if k != "rejected"}
    listed = tmp_path / "pref_data.json"
    everything = pairs + [coco, coco, empty_rejected, no_rejected]
    listed.write_text(json.dumps(everything))
    for source, expected in [(prefs_baseline, pairs), (listed, everything)]:
        out = tmp_path / f"{source.stem}_sft.json"
        proc = stic("prefs-to-sft", "--prefs", source, "--output", out)
        assert f"{len(expected)} conversations" in proc.stderr, proc.stderr
        assert json.loads(out.read_text()) == official_pref_to_sft(expected)
    assert json.loads((tmp_path / "pref_data_sft.json").read_text())[-3]["id"] == "000000000009"

    # the official prompts hold no <image>, so LLaVA's trainer drops the image: text_only follows it
    config = tmp_path / "text_only.yaml"
    config.write_text((ROOT / "configs" / "paper" / "stage2.yaml").read_text().replace(
        "text_only: false", "text_only: true"))
    out = tmp_path / "sft"
    stic("train-sft", "--model", tiny, "--data", tmp_path / "straight_sft.json", "--image-dir", IMAGES,
         "--output", out, "--config", config, "--max-steps", "1", "--lora-r", "4", "--max-length", "4096",
         "--device", "cpu", "--batch-size", "2", "--grad-accum", "1", "--gradient-checkpointing", "false")
    with open(out / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["loss"])), rows


def test_train_dpo_refuses_a_device_batch_loss_weighting(tiny, prefs_baseline, tmp_path):
    config = tmp_path / "stage1.yaml"
    config.write_text((ROOT / "configs" / "paper" / "stage1.yaml").read_text()
                      + "loss_weighting: device_batch\ndevice_batch: 16\n")
    out = tmp_path / "dpo"
    proc = stic("train-dpo", "--model", tiny, "--data", prefs_baseline, "--image-dir", IMAGES, "--output", out,
                "--config", config, "--device", "cpu", check=False)
    assert_clean_failure(proc, "loss_weighting: device_batch", "train-dpo", "remove loss_weighting and device_batch")
    assert not out.exists()


# ---------------------------------------------------------------- bad input

def test_missing_images_in_the_list_are_skipped_listed_and_counted(tiny, tmp_path):
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps(["chelsea.png", "nope_1.jpg", "coffee.png", "sub/nope_2.png"]))
    out = tmp_path / "p.jsonl"
    proc = prefs(tiny, out, "--images", listing, max_new_tokens=4)
    assert summary_counts(proc.stderr) == (2, 0, 2), proc.stderr
    assert "skipped nope_1.jpg" in proc.stderr and "skipped sub/nope_2.png" in proc.stderr, proc.stderr
    assert [r["image"] for r in read_jsonl(out)] == ["chelsea.png", "coffee.png"]
    # A rerun retries the missing ones and writes nothing twice.
    before = out.read_bytes()
    proc = prefs(tiny, out, "--images", listing, max_new_tokens=4)
    assert summary_counts(proc.stderr) == (0, 2, 2), proc.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize("command", ["prefs", "describe"])
def test_a_repeated_key_in_the_input_is_not_a_crash_half_way(tiny, tmp_path, command):
    """The shipped third_party/stic/6k_coco_names.json names 174 images twice (6,275 names, 6,099 distinct). A
    repeated key must either be refused before anything is generated, or be processed once; not stop the job with
    part of the output written."""
    out = tmp_path / "out.jsonl"
    if command == "prefs":
        listing = tmp_path / "list.json"
        listing.write_text(json.dumps(["chelsea.png", "coffee.png", "chelsea.png", "camera.png"]))
        proc = prefs(tiny, out, "--images", listing, "--batch-size", "1", max_new_tokens=4, check=False)
        key, repeated, distinct = "image", "chelsea.png", ["chelsea.png", "coffee.png", "camera.png"]
    else:
        entries = sample_entries()
        entries[3]["id"] = "ocr_17"  # vg_5 renamed: two entries with one id
        data = tmp_path / "data.json"
        data.write_text(json.dumps(entries))
        proc = describe(tiny, out, "--batch-size", "1", data=data, max_new_tokens=4, check=False)
        key, repeated, distinct = "id", "ocr_17", None
    if proc.returncode == 2:
        assert_clean_failure(proc, repeated)
        written = out.read_bytes().count(b"\n") if out.exists() else 0
        assert written == 0, f"refused only after writing {written} records:\n{proc.stderr}"
    else:
        assert proc.returncode == 0, proc.stderr
        keys = [r[key] for r in read_jsonl(out)]
        assert len(keys) == len(set(keys)), keys
        if distinct is not None:
            assert keys == distinct


def test_keep_duplicates_makes_a_pair_per_list_entry_and_resumes_and_shards(tiny, tmp_path):
    """`--keep-duplicates`: as the official generate_pref.py loops over every entry of its list, a name listed
    twice makes two pairs, each its own draw (its own position, so its own seed). Records are keyed by `index`;
    a resumed run and two joined shards give the file of one straight run."""
    names = ["chelsea.png", "coffee.png", "chelsea.png", "camera.png", "chelsea.png"]
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps(names))
    straight = tmp_path / "straight.jsonl"
    proc = prefs(tiny, straight, "--images", listing, "--keep-duplicates", "--batch-size", "2")
    assert summary_counts(proc.stderr) == (5, 0, 0), proc.stderr
    records = read_jsonl(straight)
    assert [(r["index"], r["image"]) for r in records] == list(enumerate(names))
    chelsea = [r["chosen"][1]["content"] for r in records if r["image"] == "chelsea.png"]
    assert len(set(chelsea)) == 3, "a repeated entry must be a new draw, not a copy"
    # Without the switch, one pair per image, keyed by name.
    deduplicated = tmp_path / "dedup.jsonl"
    prefs(tiny, deduplicated, "--images", listing, "--batch-size", "2")
    assert [r["image"] for r in read_jsonl(deduplicated)] == ["chelsea.png", "coffee.png", "camera.png"]

    # Killed after two records, mid-write of the third: the rerun finishes the same file.
    expected = straight.read_bytes()
    lines = expected.splitlines(keepends=True)
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    settings = Path(str(straight) + ".settings.json")
    shutil.copy(settings, str(resumed) + ".settings.json")
    proc = prefs(tiny, resumed, "--images", listing, "--keep-duplicates", "--batch-size", "1")
    assert summary_counts(proc.stderr) == (3, 2, 0), proc.stderr
    assert resumed.read_bytes() == expected

    # Two shards joined (the merge reads the keying from the shards' settings) equal one run.
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    prefs(tiny, a, "--images", listing, "--keep-duplicates", "--shard", "0/2", "--batch-size", "1")
    prefs(tiny, b, "--images", listing, "--keep-duplicates", "--shard", "1/2", "--batch-size", "3")
    assert [r["index"] for r in read_jsonl(a)] == [0, 2, 4]
    merged = tmp_path / "merged.jsonl"
    proc = stic("prefs-merge", "--inputs", b, a, "--images", listing, "--output", merged)
    assert "5 records from 2 shards" in proc.stderr, proc.stderr
    assert merged.read_bytes() == expected


def test_a_truncated_jpeg_is_skipped_and_named(tiny, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(IMAGES / "chelsea.png", images)
    shutil.copy(IMAGES / "rocket.jpg", images)
    data = (IMAGES / "rocket.jpg").read_bytes()
    (images / "broken.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "p.jsonl"
    proc = prefs(tiny, out, image_dir=images, max_new_tokens=4)
    assert summary_counts(proc.stderr) == (2, 0, 1), proc.stderr
    assert "skipped broken.jpg" in proc.stderr, proc.stderr
    assert [r["image"] for r in read_jsonl(out)] == ["chelsea.png", "rocket.jpg"]


def test_an_image_folder_without_images_is_refused(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out" / "p.jsonl"
    assert_clean_failure(prefs(tiny, out, image_dir=empty, check=False), "no images to process", empty)
    (empty / "README.txt").write_text("not an image")
    assert_clean_failure(prefs(tiny, out, image_dir=empty, check=False), "no images to process", empty)
    assert_clean_failure(prefs(tiny, out, image_dir=tmp_path / "absent", check=False), "absent", "does not exist")
    assert not (tmp_path / "out").exists()


def test_describe_skips_an_entry_whose_image_is_missing(tiny, tmp_path):
    entries = sample_entries()
    entries[3]["image"] = "no_such_photo.png"  # vg_5
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    out = tmp_path / "d.jsonl"
    proc = describe(tiny, out, data=data, max_new_tokens=4)
    assert summary_counts(proc.stderr) == (3, 0, 1), proc.stderr
    assert "skipped vg_5" in proc.stderr and "no_such_photo.png" in proc.stderr, proc.stderr
    assert [r["id"] for r in read_jsonl(out)] == ["000000033471", "ocr_17", "gqa_9"]
    proc = stic("infuse", "--data", data, "--descriptions", out, "--output", tmp_path / "i.json")
    assert "1 without a description: vg_5" in proc.stderr, proc.stderr


def test_a_turn_that_is_not_human_or_gpt_is_refused(tiny, stage1, tmp_path):
    entries = sample_entries()
    entries[1]["conversations"][1]["from"] = "assistant"  # ocr_17, turn 1
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(entries))
    descriptions = tmp_path / "d.jsonl"
    descriptions.write_text('{"id": "ocr_17", "image": "coffee.png", "description": "x"}\n')
    needles = ["entry ocr_17", "turn 1", "'assistant'"]
    outs = tmp_path / "outs"
    runs = {
        "describe": lambda: describe(tiny, outs / "d.jsonl", data=data, check=False),
        "infuse": lambda: stic("infuse", "--data", data, "--descriptions", descriptions, "--output", outs / "i.json",
                               check=False),
        "train-sft": lambda: stic("train-sft", "--model", tiny, "--init-adapter", stage1, "--data", data,
                                  "--image-dir", IMAGES, "--output", outs / "sft", "--max-steps", "1", "--lora-r", "4",
                                  "--max-length", "4096", "--device", "cpu", check=False),
        "prefs-merge": lambda: stic("prefs-merge", "--inputs", descriptions, "--data", data, "--output",
                                    outs / "m.jsonl", check=False),
    }
    outs.mkdir()
    for name, run in runs.items():
        proc = run()
        assert_clean_failure(proc, *needles)
        assert list(outs.iterdir()) == [], f"{name} wrote {list(outs.iterdir())}"


@pytest.fixture(params=["read_only_folder", "folder_is_a_file"])
def unwritable(request, tmp_path):
    """(folder that cannot be written to, its contents before). As root, chmod does not stop writes: the read-only
    folder is made immutable with chattr instead, or the case is skipped."""
    if request.param == "folder_is_a_file":
        blocker = tmp_path / "blocker"
        blocker.write_text("a regular file where the output folder should be")
        yield blocker, None
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    root = os.geteuid() == 0
    locked = False
    try:
        if root:
            locked = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, timeout=30).returncode == 0
        else:
            folder.chmod(0o555)
        try:
            (folder / "probe").write_text("x")
            (folder / "probe").unlink()
            pytest.skip("cannot make a folder read-only here (root without chattr +i)")
        except OSError:
            pass
        yield folder, ["keep.txt"]
    finally:
        if locked:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True, timeout=30)
        folder.chmod(0o755)


def test_an_unwritable_output_folder_is_refused_and_nothing_is_written(tiny, stage1, prefs_baseline, described,
                                                                       unwritable):
    folder, before = unwritable
    runs = {
        "prefs": lambda: prefs(tiny, folder / "p.jsonl", "--limit", "1", check=False),
        "describe": lambda: describe(tiny, folder / "d.jsonl", "--limit", "1", adapter=stage1, check=False),
        "infuse": lambda: stic("infuse", "--data", SAMPLE, "--descriptions", described, "--output", folder / "i.json",
                               check=False),
        "prefs-merge": lambda: stic("prefs-merge", "--inputs", prefs_baseline, "--image-dir", IMAGES, "--output",
                                    folder / "m.jsonl", check=False),
        "train-sft": lambda: stic("train-sft", "--model", tiny, "--data", SAMPLE, "--image-dir", IMAGES, "--output",
                                  folder / "sft", "--max-steps", "1", "--lora-r", "4", "--max-length", "4096",
                                  "--batch-size", "1", "--grad-accum", "1", "--device", "cpu", check=False),
    }
    for name, run in runs.items():
        proc = run()
        assert_clean_failure(proc, folder)
        if before is None:
            assert folder.is_file() and folder.read_text().startswith("a regular file"), name
        else:
            assert sorted(p.name for p in folder.iterdir()) == before, f"{name} left {list(folder.iterdir())}"
