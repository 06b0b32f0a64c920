"""What a training run records as it goes, on the tiny random model: TensorBoard event files read back with
TensorBoard's own reader, trainer_state.json (and its resumption), held-out evaluation against the training loss,
samples, train_curves.png, progress lines without a terminal, and the JSON summary."""
import csv
import json
import os
import re
import subprocess

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import IMAGES, STIC, run_stic
from test_pipeline import SAMPLE

PAIR_IMAGES = ["chelsea.png", "coffee.png", "logo.png", "camera.png"]
TINY_TRAIN = ["--lora-r", "4", "--grad-accum", "1", "--max-length", "4096", "--device", "cpu",
              "--gradient-checkpointing", "false"]


def write_pairs(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "image": PAIR_IMAGES[i % len(PAIR_IMAGES)],
                "chosen": [{"role": "user", "content": "Describe the image."},
                           {"role": "assistant", "content": f"A cat sits on a red sofa, picture {i}."}],
                "rejected": [{"role": "user", "content": "Describe the image."},
                             {"role": "assistant", "content": "Two dogs run on a beach" + " far away" * (i % 3) + "."}],
            }) + "\n")
    return path


def stic_env(*args, env=None, check=True):
    proc = subprocess.run([str(STIC), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    run_stic("init-tiny", "--output", out)
    return out


@pytest.fixture(scope="module")
def tracked(tiny, tmp_path_factory):
    """A DPO run of 4 steps with held-out data (eval every 2 steps), samples, --json, and plain progress lines."""
    root = tmp_path_factory.mktemp("tracked")
    data, held_out = write_pairs(root / "pairs.jsonl", 4), write_pairs(root / "held_out.jsonl", 3)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"image": i, "prompt": "What is shown?"}) + "\n" for i in PAIR_IMAGES[:2]))
    out = root / "out"
    proc = stic_env("train-dpo", "--model", tiny, "--data", data, "--eval-data", held_out, "--image-dir", IMAGES,
                    "--output", out, *TINY_TRAIN, "--max-steps", "4", "--lr", "1e-2", "--projector-lr", "1e-2",
                    "--eval-steps", "2", "--save-steps", "2", "--sample-prompts", prompts, "--sample-every", "2",
                    "--sample-max-new-tokens", "6", "--json", env={"STIC_PROGRESS_SECONDS": "0"})
    return out, proc


def tensorboard_scalars(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_reads_back_the_logged_scalars(tracked):
    out, _ = tracked
    files = list((out / "runs").iterdir())
    assert len(files) == 1 and re.fullmatch(r"events\.out\.tfevents\.\d+\..+\.\d+\.\d+", files[0].name), files
    acc, scalars = tensorboard_scalars(out / "runs")
    assert acc.file_version == 2.0  # parsed from "brain.Event:2"
    train, evals = read_csv(out / "train_log.csv"), read_csv(out / "eval_log.csv")
    assert [int(r["step"]) for r in train] == [1, 2, 3, 4] and [int(r["step"]) for r in evals] == [2, 4]
    expected = {}
    for rows, prefix in [(train, "train/"), (evals, "eval/")]:
        for column in rows[0]:
            if column != "step":
                tag = prefix + ("learning_rate" if column == "lr" else column)
                expected[tag] = [(int(r["step"]), float(r[column])) for r in rows]
    assert set(expected) <= set(scalars), set(expected) - set(scalars)
    assert {"train/loss", "train/rewards/margins", "train/grad_norm", "eval/loss", "eval/rewards/accuracies",
            "eval/rewards/margins", "train/epoch"} <= set(scalars)
    for tag, points in expected.items():
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (step, value), (_, logged) in zip(got, points):
            # the CSV rounds to 6 decimals (the learning rate to 4 digits, tokens/s to 1), TensorBoard keeps float32
            tolerance = {"learning_rate": 1e-3 * abs(logged), "tokens_per_s": 0.05 + 1e-6 * abs(logged)}.get(
                tag.split("/", 1)[1], 2e-6 + 1e-6 * abs(logged))
            assert abs(value - logged) <= tolerance, (tag, step, value, logged)


def test_trainer_state_has_the_log_history(tracked):
    out, _ = tracked
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["global_step"], state["max_steps"], state["eval_steps"], state["save_steps"]) == (4, 4, 2, 2)
    assert (state["logging_steps"], state["train_batch_size"]) == (1, 1)
    train = [e for e in state["log_history"] if "loss" in e]
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4] and [e["step"] for e in evals] == [2, 4]
    for entry, row in zip(train, read_csv(out / "train_log.csv")):
        assert abs(entry["loss"] - float(row["loss"])) < 1e-6 and abs(entry["learning_rate"] - float(row["lr"])) < 1e-3 * entry["learning_rate"] + 1e-12
        assert {"epoch", "grad_norm", "rewards/margins", "logps/chosen"} <= set(entry)
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen", "eval_rewards/rejected"} <= set(evals[0])
    best = min(evals, key=lambda e: e["eval_loss"])
    assert state["best_metric"] == pytest.approx(best["eval_loss"])
    assert state["best_model_checkpoint"].endswith(f"checkpoints/step-{best['step']:06d}")
    checkpoint = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert checkpoint["global_step"] == 2 and [e["step"] for e in checkpoint["log_history"]] == [1, 2, 2]


def test_samples_are_written_at_their_steps(tracked):
    out, _ = tracked
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["image"]) for r in lines] == [(2, "chelsea.png"), (2, "coffee.png"), (4, "chelsea.png"), (4, "coffee.png")]
    assert all(r["prompt"] == "What is shown?" and isinstance(r["response"], str) for r in lines)


def test_train_curves_png(tracked):
    out, _ = tracked
    image = Image.open(out / "train_curves.png")
    image.load()
    assert image.size == (1200, 800)
    pixels = image.convert("RGB").tobytes()
    assert len({pixels[i:i + 3] for i in range(0, len(pixels), 3 * 7)}) > 20, "a blank picture"


def test_progress_lines_and_summary_without_a_terminal(tracked):
    out, proc = tracked
    lines = [line for line in proc.stderr.splitlines() if line.startswith("step ")]
    assert re.fullmatch(r"step 1/4 \(25%\) · [\d.]+ steps/s · loss \d\.\d{4} · ETA \d+s", lines[1]), lines
    assert lines[-1].startswith("step 4/4 (100%)") and " · done in " in lines[-1], lines
    summary = json.loads((out / "train_summary.json").read_text())
    assert json.loads(proc.stdout) == summary
    assert (summary["steps"], summary["examples"]["used"], summary["examples"]["skipped"]) == (4, 4, 0)
    assert summary["examples"]["eval"]["report"]["used"] == 3 and summary["train_tokens_per_s"] > 0
    assert summary["final"]["loss"] == pytest.approx(float(read_csv(out / "train_log.csv")[-1]["loss"]), abs=1e-6)
    assert summary["eval"]["loss"] == pytest.approx(float(read_csv(out / "eval_log.csv")[-1]["loss"]), abs=1e-6)
    outputs = summary["outputs"]
    for key in ["adapter", "train_log", "eval_log", "trainer_state", "tensorboard", "curves", "samples"]:
        assert os.path.exists(outputs[key]), key


def test_prefs_progress_lines_without_a_terminal(tiny, tmp_path):
    proc = stic_env("prefs", "--model", tiny, "--image-dir", IMAGES, "--output", tmp_path / "prefs.jsonl", "--device",
                    "cpu", "--max-new-tokens", "2", "--limit", "2", env={"STIC_PROGRESS_SECONDS": "0"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("images ")]
    assert lines[0].startswith("images 0/2 (0%)"), proc.stderr
    assert re.fullmatch(r"images 1/2 \(50%\) · [\d.]+ images/s · shard \S+ · ETA \d+s", lines[1]), lines
    assert lines[-1].startswith("images 2/2 (100%)"), lines


def dpo_lr0(tiny, data, out, *extra):
    """One step over all of `data` (4 pairs) with nothing learned: weights after the step are those before."""
    run_stic("train-dpo", "--model", tiny, "--data", data, "--image-dir", IMAGES, "--output", out, *TINY_TRAIN,
             "--max-steps", "1", "--batch-size", "4", "--lr", "0", "--projector-lr", "0", "--lora-dropout", "0", *extra)
    state = json.loads((out / "trainer_state.json").read_text())
    train = next(e for e in state["log_history"] if "loss" in e)
    evals = next(e for e in state["log_history"] if "eval_loss" in e)
    return train, evals, json.loads((out / "train_summary.json").read_text())


def test_dpo_eval_on_the_training_rows_equals_the_training_loss(tiny, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    train, evals, _ = dpo_lr0(tiny, data, tmp_path / "out", "--eval-data", data)
    for key in ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]:
        assert abs(evals["eval_" + key] - train[key]) <= 1e-6 * max(1.0, abs(train[key])), (key, evals["eval_" + key], train[key])


def test_sft_eval_on_the_training_rows_equals_the_token_weighted_training_loss(tiny, tmp_path):
    out = tmp_path / "out"
    run_stic("train-sft", "--model", tiny, "--data", SAMPLE, "--eval-data", SAMPLE, "--image-dir", IMAGES, "--output", out,
             *TINY_TRAIN, "--max-steps", "1", "--batch-size", "5", "--lr", "0", "--projector-lr", "0", "--lora-dropout", "0")
    state = json.loads((out / "trainer_state.json").read_text())
    train = next(e for e in state["log_history"] if "loss" in e)
    evals = next(e for e in state["log_history"] if "eval_loss" in e)
    assert abs(evals["eval_loss"] - train["loss"]) <= 1e-6 * max(1.0, train["loss"]), (evals, train)
    assert read_csv(out / "eval_log.csv")[0].keys() == {"step", "loss"}


def test_the_val_split_is_seeded_and_disjoint_from_the_training_rows(tiny, tmp_path):
    lines = write_pairs(tmp_path / "pairs.jsonl", 6).read_text().splitlines(keepends=True)
    split = ["--val-fraction", "0.34"]
    train, evals, summary = dpo_lr0(tiny, tmp_path / "pairs.jsonl", tmp_path / "a", *split, "--seed", "3")
    held = summary["examples"]["eval"]["records"]
    # a function of the seed alone (ChaCha8 shuffle of the record indices): the same on every machine and run
    assert held == [1, 2] and summary["examples"]["used"] == 4
    _, _, other = dpo_lr0(tiny, tmp_path / "pairs.jsonl", tmp_path / "b", *split, "--seed", "4")
    assert other["examples"]["eval"]["records"] != held
    # the same losses from files that hold the two parts: training saw exactly the rows that were not held out,
    # with the same seed (so the split is the seed's)
    (tmp_path / "kept.jsonl").write_text("".join(l for i, l in enumerate(lines, 1) if i not in held))
    (tmp_path / "held.jsonl").write_text("".join(lines[i - 1] for i in held))
    train2, evals2, _ = dpo_lr0(tiny, tmp_path / "kept.jsonl", tmp_path / "d", "--eval-data", tmp_path / "held.jsonl", "--seed", "3")
    assert abs(train2["loss"] - train["loss"]) < 1e-6 and abs(evals2["eval_loss"] - evals["eval_loss"]) < 1e-6


def test_a_resumed_run_continues_the_history(tiny, tmp_path):
    data, held_out = write_pairs(tmp_path / "pairs.jsonl", 4), write_pairs(tmp_path / "held_out.jsonl", 1)
    out = tmp_path / "out"
    args = ["train-dpo", "--model", tiny, "--data", data, "--eval-data", held_out, "--image-dir", IMAGES, "--output", out,
            *TINY_TRAIN, "--max-steps", "4", "--save-steps", "2", "--lr", "1e-2", "--projector-lr", "1e-2"]
    run_stic(*args, "--stop-after-steps", "3")
    run_stic(*args, "--resume")
    state = json.loads((out / "trainer_state.json").read_text())
    assert [(e["step"], "eval_loss" in e) for e in state["log_history"]] == [(1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
    assert [int(r["step"]) for r in read_csv(out / "train_log.csv")] == [1, 2, 3, 4]
    assert len(list((out / "runs").iterdir())) == 2
    _, scalars = tensorboard_scalars(out / "runs")
    # TensorBoard drops the stopped run's step 3 once the resumed run logs step 3 again
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    resumed_loss = next(e["loss"] for e in state["log_history"] if e["step"] == 3 and "loss" in e)
    assert scalars["train/loss"][2][1] == pytest.approx(resumed_loss, rel=1e-6)


@pytest.mark.parametrize("content,needle", [
    ('{"image": "chelsea.png"}\n', "line 1: missing field `prompt`"),
    ('{"image": "missing.png", "prompt": "Hi"}\n', "line 1: image"),
    ("\n", "no prompts"),
])
def test_bad_sample_prompts_stop_before_training(tiny, tmp_path, content, needle):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    out = tmp_path / "out"
    proc = run_stic("train-dpo", "--model", tiny, "--data", write_pairs(tmp_path / "pairs.jsonl", 2), "--image-dir", IMAGES,
                    "--output", out, *TINY_TRAIN, "--max-steps", "1", "--sample-prompts", prompts, check=False)
    assert proc.returncode == 2 and needle in proc.stderr and "--sample-prompts" in proc.stderr, proc.stderr
    assert not (out / "train_log.csv").exists()


def test_eval_data_and_val_fraction_together_are_refused(tiny, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 2)
    proc = run_stic("train-dpo", "--model", tiny, "--data", data, "--image-dir", IMAGES, "--output", tmp_path / "out",
                    "--eval-data", data, "--val-fraction", "0.5", check=False)
    assert proc.returncode == 2 and "--val-fraction" in proc.stderr, proc.stderr
