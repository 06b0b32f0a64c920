"""`stic reproduce --nproc-per-node N`: the data-parallel steps under torchrun (gloo on the CPU), on the tiny world
of test_reproduce.py with two stage-1 images (a preference pair for each rank) and the paper profile's generations
cut to a few tokens. Two ranks give the files and the report of one process; a run killed with its process group
resumes under two ranks; a rank that dies stops the run at its step, with no marker for it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, STIC
from test_reproduce import assert_clean_failure, env_for, reproduce, world  # noqa: F401 (world: the fixture)

TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMEOUT = 900
# Files each data-parallel generation step writes (the ranks' shards joined in input order).
JSONL = ["stage1/prefs.jsonl", "stage2/descriptions.jsonl", "eval/original/scienceqa/predictions.jsonl",
         "eval/original_dar/scienceqa/descriptions.jsonl", "eval/stic_dar/scienceqa/predictions.jsonl",
         "eval/stic/scienceqa/predictions.jsonl"]
ADAPTERS = ["stage1/adapter", "stage2/adapter"]
# The measured largest difference between the adapters of 1 and 2 ranks is 0 on the tiny world (the gradients
# are averaged over the ranks in another order than summed in one process); the bound leaves room for that order.
ADAPTER_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def short(world, tmp_path_factory):  # noqa: F811
    """The paper profile with short generations, and two stage-1 images."""
    folder = tmp_path_factory.mktemp("short")
    cfg = yaml.safe_load((ROOT / "configs" / "paper" / "reproduce.yaml").read_text())
    cfg["generation"]["max_new_tokens"] = 24
    # DaR descriptions long enough that their step outlives the start of its ranks (the kill test's window)
    cfg["eval"].update(max_new_tokens=8, description_max_new_tokens=600)
    (folder / "reproduce.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "stage1.json").write_text(json.dumps(["wide.jpg", "tall.jpg"]))
    return folder


def args_of(short, ranks=None):
    args = ["--config", short / "reproduce.yaml", "--benchmarks", "scienceqa"]
    return args + (["--nproc-per-node", ranks, "--torchrun", TORCHRUN] if ranks else [])


def env_of(world, short, out, **override):  # noqa: F811
    return env_for(world, out, STIC_STAGE1_IMAGES=short / "stage1.json", **override)


def steps_run(stderr):
    return [line.split("] ", 1)[1].split(" done in ")[0] for line in stderr.splitlines()
            if line.startswith("[") and " done in " in line]


def rank_pids(run, rank=None):
    """The processes that run a step of the reproduce run writing to `run` (by the environment they inherit)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"STIC_OUTPUT={run}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env) and (
                rank is None or f"RANK={rank}".encode() in env):
            pids.append(int(entry.name))
    return pids


def report_of(out):
    report = json.loads((out / "report" / "reproduce.json").read_text())
    return report["benchmarks"], (out / "report" / "reproduce.md").read_text().replace(str(out), "OUT")


def assert_same_outputs(single, ranks):
    for name in JSONL:
        assert (ranks / "run" / name).read_bytes() == (single / "run" / name).read_bytes(), name
    for name in ADAPTERS:
        a = load_file(single / "run" / name / "adapter_model.safetensors")
        b = load_file(ranks / "run" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{name}: largest difference between 1 and 2 ranks {worst:.2e}")
        assert worst <= ADAPTER_TOLERANCE, f"{name}: largest difference {worst:.2e}"
    assert report_of(ranks) == report_of(single)


@pytest.fixture(scope="module")
def one_process(world, short, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("one")
    proc = reproduce(*args_of(short), env=env_of(world, short, out), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return out


def test_plan_shows_torchrun_and_the_grad_accum_of_each_rank(world, short, tmp_path):  # noqa: F811
    env = env_of(world, short, tmp_path)
    proc = reproduce(*args_of(short, 2), "--plan", env=env)
    assert proc.returncode == 0, proc.stderr
    commands = {line.split(". ")[1].split(" ")[0]: next_line.split("command: ")[1]
                for line, next_line in zip(proc.stdout.splitlines(), proc.stdout.splitlines()[1:])
                if "command: " in next_line}
    prefix = f"{TORCHRUN} --standalone --nproc-per-node 2 --no-python stic "
    for step in ["prefs", "describe", "train-dpo", "train-sft", "eval-original-scienceqa", "eval-stic_dar-scienceqa"]:
        assert commands[step].startswith(prefix + step.split("-")[0]), commands[step]
    assert commands["infuse"].startswith("stic infuse"), "infuse has no data-parallel mode"
    assert commands["train-dpo"].endswith("--grad-accum 4") and commands["train-sft"].endswith("--grad-accum 4")
    one = reproduce(*args_of(short), "--plan", env=env)
    assert f"{TORCHRUN} " not in one.stdout and "--grad-accum" not in one.stdout
    # 3 ranks cannot share the global batch of 8 (grad_accum 8 of the paper's stage configs).
    proc = reproduce(*args_of(short, 3), "--plan", env=env)
    assert "train-dpo: grad_accum 8 of its training config is not a multiple of --nproc-per-node 3" in proc.stdout
    assert_clean_failure(reproduce(*args_of(short, 3), env=env), "cannot start", "not a multiple of --nproc-per-node 3")
    assert not (tmp_path / "run").exists()


def test_without_torchrun_two_ranks_are_a_clear_error(world, short, tmp_path):  # noqa: F811
    env = env_of(world, short, tmp_path, PATH="/usr/bin:/bin")
    assert_clean_failure(reproduce(*args_of(short), "--nproc-per-node", 2, "--plan", env=env),
                         "--nproc-per-node 2 runs the data-parallel steps under torchrun, which is not on PATH",
                         "pip install torch", "--torchrun PATH")
    assert_clean_failure(reproduce(*args_of(short), "--nproc-per-node", 2, "--torchrun", tmp_path / "none", env=env),
                         f"--torchrun {tmp_path / 'none'}: no such file")
    assert reproduce(*args_of(short), "--plan", env=env).returncode == 0, "one process needs no torchrun"


def test_two_ranks_give_the_files_and_report_of_one_process(world, short, one_process, tmp_path):  # noqa: F811
    proc = reproduce(*args_of(short, 2), env=env_of(world, short, tmp_path), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert_same_outputs(one_process, tmp_path)
    for step in ["prefs", "train-dpo", "infuse", "eval-stic-scienceqa"]:
        single = json.loads((one_process / "run" / ".steps" / f"{step}.json").read_text())
        ranks = json.loads((tmp_path / "run" / ".steps" / f"{step}.json").read_text())
        in_place = [arg.replace(str(tmp_path), str(one_process)) for arg in ranks["command"]]
        assert in_place == single["command"], "the ranks are not part of a step's identity"
        assert "ranks" not in single and ranks.get("ranks") == (None if step == "infuse" else 2), ranks
    # The finished one-process run, rerun with 2 ranks: nothing but the report runs again.
    proc = reproduce(*args_of(short, 2), env=env_of(world, short, one_process), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert steps_run(proc.stderr) == ["report"], proc.stderr


def test_killed_with_its_process_group_under_two_ranks_it_resumes(world, short, one_process, tmp_path):  # noqa: F811
    env = env_of(world, short, tmp_path)
    run = tmp_path / "run"
    args = [str(STIC), "reproduce", *map(str, args_of(short, 2))]
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    # Killed while a step after prefs runs on its two ranks, once both have lived a second (past their start, where
    # each rank asks to go with its torchrun): train-dpo on a slow machine, else at the latest a DaR evaluation.
    first_seen = {}
    while True:
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        now, pids = time.monotonic(), rank_pids(run)
        first_seen = {pid: first_seen.get(pid, now) for pid in pids}
        if len(pids) == 2 and (run / ".steps" / "prefs.json").exists() and min(first_seen.values()) <= now - 1:
            break
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = {marker.stem for marker in (run / ".steps").glob("*.json")}
    deadline = time.monotonic() + 30
    while rank_pids(run):
        assert time.monotonic() < deadline, f"ranks outlived their torchrun: {rank_pids(run)}"
        time.sleep(0.2)
    assert {marker.stem for marker in (run / ".steps").glob("*.json")} == done, "nothing finished after the kill"
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "prefs: done before, skipped" in proc.stderr
    summary = json.loads((run / "reproduce_summary.json").read_text())
    assert summary["steps_skipped"] == len(done) and steps_run(proc.stderr)[0] not in done, (done, proc.stderr)
    assert_same_outputs(one_process, tmp_path)


def test_a_rank_that_dies_stops_the_run_at_its_step(world, short, tmp_path):  # noqa: F811
    env = env_of(world, short, tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen([str(STIC), "reproduce", *map(str, args_of(short, 2))], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (victims := rank_pids(run, rank=1)):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(victims[0], signal.SIGKILL)
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, stderr
    step = stderr.split("error: step ")[1].split(" failed")[0]
    assert f"step {step} failed (exit code 1 of torchrun, whose report above names the rank that failed first)" in stderr
    assert step in ("prefs", "train-dpo"), stderr
    assert not (run / ".steps" / f"{step}.json").exists()
    assert "panicked" not in stderr
