"""stic::dist (c10d through the C++ shim, gloo on CPU) under torchrun and by hand: the collectives, and what
the other ranks say when one is lost. Loopback only; every process has a time limit."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, STIC

TORCHRUN = Path(sys.executable).with_name("torchrun")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith(("TORCHELASTIC_", "STIC_DIST_"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def rank_env(rank, world, port, **extra):
    return clean_env(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_all_reduce_broadcast_barrier(world):
    cmd = [TORCHRUN, "--nproc-per-node", world, "--master-addr", "127.0.0.1", "--master-port", free_port(),
           "--no-python", STIC, "dist-check"]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=180, cwd=ROOT, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert sorted(line["rank"] for line in lines) == list(range(world)), proc.stdout
    for line in lines:
        assert line["world_size"] == world
        assert line["backend"] == "gloo"
        assert line["sum"] == world * (world - 1) / 2  # all-reduce of each rank's number
        assert line["broadcast"] == 7  # rank 0's 0 * 10 + 7


def test_without_torchrun_there_is_no_group():
    proc = subprocess.run([str(STIC), "dist-check"], capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout) == [{"rank": 0, "world_size": 1, "backend": "none", "device": "Cpu", "sum": 0.0, "broadcast": 7.0}]


def test_bad_environment_and_missing_rank_are_named():
    proc = subprocess.run([str(STIC), "dist-check"], capture_output=True, text=True, timeout=60,
                          env=clean_env(WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()))
    assert proc.returncode == 2 and "RANK is not set" in proc.stderr, proc.stderr
    # Rank 0 alone: rank 1 never checks in.
    start = time.monotonic()
    proc = subprocess.run([str(STIC), "dist-check"], capture_output=True, text=True, timeout=60,
                          env=rank_env(0, 2, free_port(), STIC_DIST_JOIN_TIMEOUT=2))
    assert proc.returncode == 2, proc.stderr
    assert "rank 1 did not join the group" in proc.stderr, proc.stderr
    assert time.monotonic() - start < 30


def start_pair(tmp_path, stall_rank, **extra):
    """Two ranks by hand; `stall_rank` stops before the all-reduce, which the other then waits in."""
    port = free_port()
    procs, errs = [], []
    for rank in range(2):
        err = tmp_path / f"rank{rank}.err"
        errs.append(err)
        with open(err, "w") as f:
            procs.append(subprocess.Popen([str(STIC), "dist-check", "--stall-rank", str(stall_rank)], stdout=subprocess.PIPE,
                                          stderr=f, text=True, env=rank_env(rank, 2, port, **extra)))
    deadline = time.monotonic() + 60
    while "stalling" not in errs[stall_rank].read_text():
        assert time.monotonic() < deadline, "the group did not form within 60 s"
        assert all(p.poll() is None for p in procs), [e.read_text() for e in errs]
        time.sleep(0.1)
    time.sleep(1.0)  # the other rank is now blocked in the all-reduce
    return procs, errs


def stop_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "store-host"])
def test_killed_rank_is_named_by_the_survivor(tmp_path, victim):
    procs, errs = start_pair(tmp_path, victim)
    try:
        start = time.monotonic()
        procs[victim].send_signal(signal.SIGKILL)
        survivor = 1 - victim
        procs[survivor].wait(timeout=60)
        elapsed = time.monotonic() - start
        err = errs[survivor].read_text()
        assert procs[survivor].returncode not in (0, None), err
        assert f"rank {victim} lost contact with the group" in err, err
        assert elapsed < 60
    finally:
        stop_all(procs)


def test_frozen_rank_is_named_after_the_peer_timeout(tmp_path):
    """A rank that stops answering without closing its sockets (a frozen or vanished host): the heartbeat watchdog."""
    procs, errs = start_pair(tmp_path, 1, STIC_DIST_PEER_TIMEOUT=3)
    try:
        start = time.monotonic()
        procs[1].send_signal(signal.SIGSTOP)
        procs[0].wait(timeout=60)
        err = errs[0].read_text()
        assert procs[0].returncode == 2, err
        assert "rank 1 lost contact with the group (no heartbeat for 3 s)" in err, err
        assert time.monotonic() - start < 30
    finally:
        stop_all(procs)


def write_pairs(path, n):
    images = ["chelsea.png", "coffee.png", "logo.png", "camera.png"]
    with open(path, "w") as f:
        for i in range(n):
            user = {"role": "user", "content": "Describe the image."}
            f.write(json.dumps({
                "image": images[i % len(images)],
                "chosen": [user, {"role": "assistant", "content": f"A picture, number {i}, with a cat on a sofa."}],
                "rejected": [user, {"role": "assistant", "content": "Two dogs run on a beach."}],
            }) + "\n")
    return path


def torchrun(world, *args, timeout=300):
    cmd = [TORCHRUN, "--nproc-per-node", world, "--master-addr", "127.0.0.1", "--master-port", free_port(),
           "--no-python", STIC, *args]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    return proc


def test_two_ranks_train_like_one_process_with_the_same_global_batch(hf_models, tmp_path):
    """6 DPO steps, world 2 × batch 1 against 1 process × batch 2 (the same global batch); then a torchrun run
    stopped after 3 steps and resumed under torchrun ends at the same adapter."""
    from safetensors.torch import load_file

    from conftest import IMAGES, run_stic

    _, folder = hf_models["gqa"]
    data = write_pairs(tmp_path / "pairs.jsonl", n=6)  # 3 steps an epoch: the 6 steps cross an epoch boundary
    common = ["--model", folder, "--data", data, "--image-dir", IMAGES, "--max-steps", 6, "--lr", "1e-3",
              "--projector-lr", "1e-3", "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0, "--grad-accum", 1,
              "--dtype", "f32", "--device", "cpu", "--max-length", 4096, "--seed", 3, "--save-steps", 3]
    run_stic("train-dpo", "--output", tmp_path / "single", "--batch-size", 2, *common)
    torchrun(2, "train-dpo", "--output", tmp_path / "ranks", "--batch-size", 1, *common)
    torchrun(2, "train-dpo", "--output", tmp_path / "resumed", "--batch-size", 1, *common, "--stop-after-steps", 3)
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    torchrun(2, "train-dpo", "--output", tmp_path / "resumed", "--batch-size", 1, *common, "--resume")

    single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    for run in ["ranks", "resumed"]:
        got = load_file(tmp_path / run / "adapter_model.safetensors")
        assert got.keys() == single.keys()
        worst = max((got[k] - single[k]).abs().max().item() for k in single)
        assert worst <= 1e-5, f"{run}: largest difference {worst:.2e}"
    # Rank 0 alone logs every step once, with the metrics averaged over the ranks.
    rows = [line.split(",") for line in (tmp_path / "single" / "train_log.csv").read_text().splitlines()]
    for run in ["ranks", "resumed"]:
        dist_rows = [line.split(",") for line in (tmp_path / run / "train_log.csv").read_text().splitlines()]
        assert dist_rows[0] == rows[0] and [r[0] for r in dist_rows[1:]] == [str(i) for i in range(1, 7)]
        for a, b in zip(rows[1:], dist_rows[1:]):
            assert abs(float(a[1]) - float(b[1])) <= 1e-5, (a, b)  # loss
    assert sorted(p.name for p in (tmp_path / "ranks" / "checkpoints").iterdir()) == ["latest", "step-000003", "step-000006"]


# ---------------------------------------------------------------- generation jobs: one shard per rank

def shard_env_error(command, *args):
    """`command` as rank 0 of a world of 2 with --shard: refused before joining the group."""
    return subprocess.run([str(STIC), command, *map(str, args), "--shard", "0/2"], capture_output=True, text=True,
                          timeout=60, env=rank_env(0, 2, free_port()))


def job_images(tmp_path):
    """Five photos (the ranks get 3 and 2) and a truncated JPEG that every run skips."""
    from conftest import IMAGES
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ["chelsea.png", "coffee.png", "logo.png", "camera.png", "rocket.jpg"]:
        (folder / name).write_bytes((IMAGES / name).read_bytes())
    data = (IMAGES / "rocket.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 2])
    return folder


def test_prefs_under_torchrun_equals_the_unsharded_run(hf_models, tmp_path):
    from conftest import run_stic

    _, model = hf_models["gqa"]
    images = job_images(tmp_path)
    common = ["prefs", "--model", model, "--image-dir", images, "--device", "cpu", "--max-new-tokens", 6, "--seed", 5]
    run_stic(*common, "--output", tmp_path / "single.jsonl", "--batch-size", 4)
    out = tmp_path / "ranks" / "prefs.jsonl"
    proc = torchrun(2, *common, "--output", out, "--batch-size", 2)
    assert out.read_bytes() == (tmp_path / "single.jsonl").read_bytes()
    names = sorted(p.name for p in images.iterdir())  # broken.jpg is position 0: rank 0 skips it
    parts = [json.loads(line)["image"] for i in range(2)
             for line in (out.parent / f"prefs.shard-{i}-of-2.jsonl").read_text().splitlines()]
    assert parts == [n for n in names[0::2] if n != "broken.jpg"] + names[1::2]
    assert "skipped broken.jpg" in proc.stderr and "5 records joined from 2 ranks" in proc.stderr, proc.stderr
    # A rerun resumes every rank's shard file: nothing is generated again, the output stays.
    proc = torchrun(2, *common, "--output", out, "--batch-size", 2)
    assert proc.stderr.count("0 written") == 2, proc.stderr
    assert out.read_bytes() == (tmp_path / "single.jsonl").read_bytes()

    proc = shard_env_error(*common, "--output", tmp_path / "x.jsonl")
    assert proc.returncode == 2 and "--shard 0/2 under torchrun (WORLD_SIZE=2)" in proc.stderr, proc.stderr
    assert "panicked" not in proc.stderr and not (tmp_path / "x.jsonl").exists()


def test_eval_with_dar_under_torchrun_equals_the_unsharded_run(hf_models, tmp_path):
    import eval_data
    from conftest import run_stic

    _, model = hf_models["gqa"]
    bench = eval_data.textvqa(tmp_path / "data")
    common = ["eval", "--model", model, "--benchmark", "textvqa", "--data", bench.path, "--device", "cpu",
              "--max-new-tokens", 4, "--dar", "--description-max-new-tokens", 4]
    single = run_stic(*common, "--output", tmp_path / "single")
    proc = torchrun(2, *common, "--output", tmp_path / "ranks", "--batch-size", 1)
    for name in ["descriptions.jsonl", "predictions.jsonl", "summary.json"]:
        assert (tmp_path / "ranks" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert json.loads((tmp_path / "ranks" / "summary.json").read_text())["answered"] == len(bench.ids)
    assert json_lines(proc.stdout) == json_lines(single.stdout), "rank 0 alone prints the summary"

    proc = shard_env_error(*common, "--output", tmp_path / "x")
    assert proc.returncode == 2 and "drop --shard" in proc.stderr, proc.stderr
