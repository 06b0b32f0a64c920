"""Bad input, table-driven (issue 15): every case ends with its exit code and a phrase of its message, destroys no
input, leaves nothing behind in its output folder (or only what it names), and no case of the table panics. Then
the cases that need state: a rerun with other settings, a second writer, a full and a read-only disk.

One tiny model serves every case; generation runs 1 token for 1 item."""
import fcntl
import fnmatch
import hashlib
import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import eval_data
from conftest import IMAGES, ROOT, run_stic
from test_dpo import fill, small_disk, write_pairs  # noqa: F401 (small_disk is a fixture)
from test_errors import assert_clean_failure, png_bytes

SAMPLE = Path(__file__).parent / "data" / "llava_sample.json"
CPU = ["--device", "cpu"]
ONE_TOKEN = [*CPU, "--max-new-tokens", "1"]
TRAIN = [*CPU, "--lora-r", "2", "--grad-accum", "1", "--max-length", "4096",
         "--gradient-checkpointing", "false"]
PROMPT = ["--prompt", "Describe the image."]


class World:
    """The inputs of every case, in one folder whose files no case may change."""

    def __init__(self, root):
        self.root = root
        self.model = root / "model"
        run_stic("init-tiny", "--output", self.model, timeout=120)
        # The same weights with a context too short for one image's tokens.
        self.short_context = root / "short_context"
        self.short_context.mkdir()
        for f in self.model.iterdir():
            (self.short_context / f.name).symlink_to(f)
        (self.short_context / "config.json").unlink()
        config = json.loads((self.model / "config.json").read_text())
        config["text_config"]["max_position_embeddings"] = 200
        (self.short_context / "config.json").write_text(json.dumps(config))
        (root / "model_link").symlink_to(self.model)
        self.adapter = root / "adapter"  # only its path matters: the cases fail before reading it
        self.adapter.mkdir()
        (self.adapter / "adapter_config.json").write_text("{}")

        self.list = self.write("list.json", json.dumps(["chelsea.png"]))
        os.link(self.list, root / "list_hard_link.json")
        (root / "list_symlink.json").symlink_to(self.list)
        self.write("empty_list.json", "[]")
        self.data = self.write("data.json", SAMPLE.read_text())
        entries = json.loads(SAMPLE.read_text())
        self.write("null_id.json", json.dumps([entries[0], {**entries[1], "id": None}, *entries[2:]]))
        self.write("shared_id.json", json.dumps([*entries[:3], {**entries[3], "id": entries[1]["id"]}, *entries[4:]]))
        self.write("latin1.json", b'[\n{"id": "a", "conversations": []},\n{"id": "caf\xe9", "conversations": []}]')
        self.write("sft_odd_turns.json", json.dumps([{**entries[0], "conversations": entries[0]["conversations"][:1]}]))
        self.descriptions = self.write("descriptions.jsonl", '{"id": "ocr_17", "image": "coffee.png", "description": "x"}\n')

        self.pairs = write_pairs(root / "pairs.jsonl", n=2)
        pair = json.loads(self.pairs.read_text().splitlines()[0])
        self.write("pairs_latin1.jsonl", json.dumps(pair).encode() + b'\n{"image": "caf\xe9.png"}\n')
        self.write("pairs_list.json", json.dumps([{"image": "chelsea.png"}, pair]))
        self.write("pairs_bomb.jsonl", "".join(json.dumps({**pair, "image": name}) + "\n"
                                               for name in ["chelsea.png", "bomb.png"]))
        self.write("pairs_missing_image.jsonl", json.dumps({**pair, "image": "absent.png"}) + "\n")
        self.write("pairs_truncated.jsonl", json.dumps({**pair, "image": "truncated.jpg"}) + "\n")
        self.images = root / "images"
        self.images.mkdir()
        shutil.copy(IMAGES / "chelsea.png", self.images)
        side = 20000  # 400 megapixels of zeros, a few hundred kilobytes on disk
        (self.images / "bomb.png").write_bytes(png_bytes(side, side, bytes(side + 1) * 64))
        jpeg = (IMAGES / "rocket.jpg").read_bytes()
        (self.images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])

        stage1 = (ROOT / "configs" / "paper" / "stage1.yaml").read_text()
        for key, value in [("warmup_ratio", "2"), ("max_grad_norm", "-1"), ("weight_decay", "-0.1"), ("lr", "-1"),
                           ("dtype", "f16")]:
            lines = [f"{key}: {value}" if line.startswith(f"{key}:") else line for line in stage1.splitlines()]
            self.write(f"config_{key}.yaml", "\n".join(lines) + "\n")
        self.image = self.write("photo.png", (IMAGES / "chelsea.png").read_bytes())

    def write(self, name, content):
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def __getitem__(self, name):
        return self.root / name

    def digest(self):
        """Every file of the world (links followed) and its content hash."""
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory):
    """A stage-1 adapter of one step; its run must not leave its lock file behind."""
    out = tmp_path_factory.mktemp("adapter") / "run"
    run_stic("train-dpo", "--model", world.model, "--data", world.pairs, "--image-dir", IMAGES, "--output", out,
             *TRAIN, "--max-steps", "1")
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / ".stic.lock").exists(), "a finished run leaves its lock file"
    return out


@dataclass
class Case:
    name: str
    args: Callable  # (world, out folder) -> argv after `stic`
    phrase: str
    code: int = 2
    leaves: list = field(default_factory=list)  # files the case may leave in its output folder (fnmatch patterns)


def generate(*flags):
    return lambda w, out: ["generate", "--model", w.model, "--image", w.image, *PROMPT, *ONE_TOKEN, *flags]


def at(w, out, flags):
    """`@name` is the world's file `name`, `%name` the case's output folder's `name`."""
    def resolve(f):
        if isinstance(f, str) and f[:1] == "@":
            return w[f[1:]]
        if isinstance(f, str) and f[:1] == "%":
            return out / f[1:]
        return f
    return [resolve(f) for f in flags]


def stic(*flags):
    return lambda w, out: at(w, out, flags)


def prefs(*flags):
    return stic("prefs", "--model", "@model", "--image-dir", IMAGES, "--output", "%p.jsonl", *ONE_TOKEN, *flags)


def train(command, *flags, data="@pairs.jsonl", images=IMAGES, output="%run", steps="1"):
    return stic(command, "--model", "@model", "--data", data, "--image-dir", images, "--output", output, *TRAIN,
                "--max-steps", steps, *flags)


RANGE = "is not a finite number, 0 or more"
CASES = [
    # Sampling and training values
    Case("generate --temperature -1", generate("--temperature", "-1"), f"-1 {RANGE}"),
    Case("generate --temperature nan", generate("--temperature", "nan"), f"NaN {RANGE}"),
    Case("generate --temperature inf", generate("--temperature", "inf"), f"inf {RANGE}"),
    Case("generate --top-p 2", generate("--top-p", "2"), "2 is not a number above 0 and at most 1"),
    Case("generate --top-p -0.5", generate("--top-p", "-0.5"), "-0.5 is not a number above 0 and at most 1"),
    Case("generate --top-p nan", generate("--top-p", "nan"), "NaN is not a number above 0 and at most 1"),
    Case("prefs --temperature -1", prefs("--temperature", "-1"), f"'--temperature <TEMPERATURE>': -1 {RANGE}"),
    Case("describe --temperature -1",
         stic("describe", "--model", "@model", "--data", "@data.json", "--image-dir", IMAGES, "--output", "%d.jsonl",
              "--temperature", "-1"), f"-1 {RANGE}"),
    Case("train-dpo --lr -1", train("train-dpo", "--lr", "-1"), f"training setting lr: -1 {RANGE}; set it with --lr"),
    Case("train-dpo --lr nan", train("train-dpo", "--lr", "nan"), f"training setting lr: NaN {RANGE}"),
    Case("train-dpo --beta -1", train("train-dpo", "--beta", "-1"), "dpo.beta: -1 is not a finite number above 0"),
    Case("train-dpo --alpha -1", train("train-dpo", "--alpha", "-1"), f"dpo.alpha: -1 {RANGE}; set it with --alpha"),
    Case("train-dpo --projector-lr -1", train("train-dpo", "--projector-lr", "-1"), f"projector_lr: -1 {RANGE}"),
    Case("train-dpo --epochs 0", train("train-dpo", "--epochs", "0"), "epochs: 0 is not a finite number above 0"),
    Case("train-sft --lr -1", train("train-sft", "--lr", "-1", data="@data.json"), f"training setting lr: -1 {RANGE}"),
    Case("config warmup_ratio: 2", train("train-dpo", "--config", "@config_warmup_ratio.yaml"),
         "warmup_ratio: 2 is not a number from 0 to 1; set `warmup_ratio` in the --config YAML"),
    Case("config max_grad_norm: -1", train("train-dpo", "--config", "@config_max_grad_norm.yaml"),
         f"max_grad_norm: -1 {RANGE}"),
    Case("config weight_decay: -0.1", train("train-dpo", "--config", "@config_weight_decay.yaml"),
         f"weight_decay: -0.1 {RANGE}"),
    Case("config lr: -1", train("train-sft", "--config", "@config_lr.yaml", data="@data.json"),
         f"training setting lr: -1 {RANGE}"),
    # f16 without loss scaling would underflow the gradients
    Case("train-dpo --dtype f16", train("train-dpo", "--dtype", "f16"),
         "training setting dtype: f16 trains without loss scaling, so small gradients underflow; use bf16 (or f32); "
         "set it with --dtype"),
    Case("config dtype: f16", train("train-sft", "--config", "@config_dtype.yaml", data="@data.json"),
         "training setting dtype: f16 trains without loss scaling"),
    # Outputs that would destroy an input
    Case("prefs --output = --images", stic("prefs", "--model", "@model", "--image-dir", IMAGES, "--images",
                                           "@list.json", "--output", "@list.json"), "is the --images file"),
    Case("prefs --output = a hard link of --images",
         stic("prefs", "--model", "@model", "--image-dir", IMAGES, "--images", "@list.json", "--output",
              "@list_hard_link.json"), "is the --images file"),
    Case("prefs --output = a symlink to --images",
         stic("prefs", "--model", "@model", "--image-dir", IMAGES, "--images", "@list.json", "--output",
              "@list_symlink.json"), "is the --images file"),
    Case("describe --output = --data",
         stic("describe", "--model", "@model", "--data", "@data.json", "--image-dir", IMAGES, "--output", "@data.json"),
         "is the --data file"),
    Case("score --logits-out MODEL/model.safetensors",
         stic("score", "--model", "@model", "--image", "@photo.png", *PROMPT, "--response", "x", "--logits-out",
              "@model/model.safetensors"), "lies inside the --model folder"),
    Case("score --logits-out through a symlink to the model",
         stic("score", "--model", "@model", "--image", "@photo.png", *PROMPT, "--response", "x", "--logits-out",
              "@model_link/new/logits.safetensors"), "lies inside the --model folder"),
    Case("infuse --output = --descriptions",
         stic("infuse", "--data", "@data.json", "--descriptions", "@descriptions.jsonl", "--output",
              "@descriptions.jsonl"), "is the --descriptions file"),
    Case("prefs-merge --output = a shard",
         stic("prefs-merge", "--inputs", "@descriptions.jsonl", "--data", "@data.json", "--output",
              "@descriptions.jsonl"), "is the --inputs file"),
    Case("train-dpo --output inside the model", train("train-dpo", output="@model/run"), "lies inside the --model"),
    Case("train-sft --output = --init-adapter", train("train-sft", "--init-adapter", "@adapter", data="@data.json",
                                                      output="@adapter"), "is the --init-adapter folder"),
    Case("merge --output inside the model", stic("merge", "--model", "@model", "--adapter", "@adapter", "--output",
                                                 "@model/merged"), "lies inside the --model folder"),
    Case("eval --output inside the adapter",
         stic("eval", "--model", "@model", "--adapter", "@adapter", "--benchmark", "textvqa", "--data", "%data",
              "--output", "@adapter/eval"), "lies inside the --adapter folder"),
    Case("corrupt --output = --image", stic("corrupt", "--image", "@photo.png", "--output", "@photo.png", "--kind",
                                            "resize20"), "is the --image file"),
    # Messages that misled
    Case("an empty --images list", prefs("--images", "@empty_list.json"), "the image list"),
    Case("an --image-dir that is a file", stic("prefs", "--model", "@model", "--image-dir", "@list.json", "--output",
                                               "%p.jsonl"), "list.json is a file: give the folder"),
    Case("an entry with a null id",
         stic("describe", "--model", "@model", "--data", "@null_id.json", "--image-dir", IMAGES, "--output", "%d.jsonl"),
         "null_id.json, entry 2: the id null is not a string or a number"),
    Case("two entries with one id, describe",
         stic("describe", "--model", "@model", "--data", "@shared_id.json", "--image-dir", IMAGES, "--output",
              "%d.jsonl"), "entries 2 and 4 have the id ocr_17 but different images"),
    Case("two entries with one id, infuse",
         stic("infuse", "--data", "@shared_id.json", "--descriptions", "@descriptions.jsonl", "--output", "%i.json"),
         "entries 2 and 4 have the id ocr_17 but different images"),
    Case("describe data not UTF-8",
         stic("describe", "--model", "@model", "--data", "@latin1.json", "--image-dir", IMAGES, "--output", "%d.jsonl"),
         "latin1.json, line 3: not UTF-8"),
    Case("train-sft data not UTF-8", train("train-sft", data="@latin1.json"), "latin1.json, line 3: not UTF-8"),
    Case("train-dpo data not UTF-8", train("train-dpo", data="@pairs_latin1.jsonl"),
         "pairs_latin1.jsonl, line 2: not UTF-8"),
    Case("train-sft numbers records from 1", train("train-sft", data="@sft_odd_turns.json"),
         "sft_odd_turns.json record 1: entry 000000033471: 1 turns"),
    Case("train-dpo numbers JSON-list records from 1", train("train-dpo", data="@pairs_list.json"),
         "pairs_list.json: record 1: missing field"),
    Case("a missing image in DPO data", train("train-dpo", data="@pairs_missing_image.jsonl"),
         "pairs_missing_image.jsonl record 1: image"),
    Case("a bomb image in DPO data", train("train-dpo", data="@pairs_bomb.jsonl", images="@images"),
         "pairs_bomb.jsonl record 2: image"),
    Case("--lr that overflows before any checkpoint",
         train("train-dpo", "--lr", "1e38", "--projector-lr", "1e38", steps="2"),
         "there is no checkpoint yet", leaves=["run/train_log.csv", "run/runs/events.out.tfevents.*"]),
    Case("score --logits-out into a missing folder",
         stic("score", "--model", "@model", "--image", "@photo.png", *PROMPT, "--response", "x", "--logits-out",
              "%new/dir/logits.safetensors", *CPU), "", code=0, leaves=["new/dir/logits.safetensors"]),
    # Leftovers after a clean error
    Case("train-dpo --resume with nothing to resume", train("train-dpo", "--resume"), "nothing to resume"),
    Case("train-dpo stopped by an image in its first step", train("train-dpo", data="@pairs_truncated.jsonl",
                                                                  images="@images"), "truncated"),
    Case("describe stopped before its first record",
         stic("describe", "--model", "@short_context", "--data", "@data.json", "--image-dir", IMAGES, "--output",
              "%deep/d.jsonl", *ONE_TOKEN), "the model's context is 200"),
]


def test_bad_inputs_table(world, tmp_path):
    """Every case: its exit code and phrase, no panic, no input changed, nothing left but what it names."""
    before = world.digest()
    problems, panics = [], []
    for i, case in enumerate(CASES):
        out = tmp_path / f"case{i}"
        out.mkdir()
        argv = case.args(world, out)
        proc = run_stic(*argv, check=False, timeout=300)
        where = f"[{case.name}] stic {' '.join(map(str, argv))}\n{proc.stderr[-2000:]}"
        if "panicked" in proc.stderr or "RUST_BACKTRACE" in proc.stderr:
            panics.append(where)
        if proc.returncode != case.code:
            problems.append(f"exit {proc.returncode}, expected {case.code}: {where}")
        elif case.phrase not in proc.stderr:
            problems.append(f"{case.phrase!r} not in the message: {where}")
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        if len(left) != len(case.leaves) or not all(fnmatch.fnmatch(f, p) for f, p in zip(left, sorted(case.leaves))):
            problems.append(f"left {left}, expected {case.leaves}: {where}")
    assert panics == [], f"{len(panics)} of {len(CASES)} cases panicked:\n" + "\n".join(panics)
    assert problems == [], "\n".join(problems)
    assert world.digest() == before, "a case changed one of its inputs"


# ---------------------------------------------------------------- a rerun with other settings

def test_a_rerun_with_other_settings_is_refused_and_names_them(world, tmp_path):
    other_model = shutil.copytree(world.model, tmp_path / "other_model")
    out = tmp_path / "p.jsonl"
    common = ["--image-dir", IMAGES, "--images", world.list, "--output", out, *ONE_TOKEN]
    run_stic("prefs", "--model", world.model, *common)
    written = out.read_bytes()
    assert json.loads((tmp_path / "p.jsonl.settings.json").read_text())["seed"] == 42
    for flags, phrase in [(["--model", world.model, "--seed", "7"], "seed (42 before, 7 now)"),
                          (["--model", other_model], f'model ("{world.model.resolve()}" before, "{other_model.resolve()}" now)'),
                          (["--model", world.model, "--temperature", "0"], "temperature (0.2 before, 0.0 now)")]:
        proc = run_stic("prefs", *common, *flags, check=False)
        assert_clean_failure(proc, "p.jsonl holds 1 record(s) made with other settings", phrase)
        assert out.read_bytes() == written
    proc = run_stic("prefs", "--model", world.model, *common)
    assert "0 written, 1 already there" in proc.stderr, proc.stderr

    described = tmp_path / "d.jsonl"
    describe = ["describe", "--model", world.model, "--data", world.data, "--image-dir", IMAGES, "--output", described,
                "--limit", "1", *CPU]
    run_stic(*describe, "--max-new-tokens", "1")
    proc = run_stic(*describe, "--max-new-tokens", "2", check=False)
    assert_clean_failure(proc, "max_new_tokens (1 before, 2 now)")

    bench = eval_data.textvqa(tmp_path / "textvqa")
    evaluate = ["eval", "--model", world.model, "--benchmark", "textvqa", "--data", bench.path, "--output",
                tmp_path / "eval", "--limit", "1", *CPU]
    run_stic(*evaluate, "--max-new-tokens", "1")
    proc = run_stic(*evaluate, "--max-new-tokens", "2", check=False)
    assert_clean_failure(proc, "eval holds predictions made with other settings", "generation.max_new_tokens (1 before, 2 now)")


# ---------------------------------------------------------------- two writers, a full disk, a read-only disk

@pytest.mark.parametrize("command", ["train-dpo", "train-sft"])
def test_a_second_training_run_into_one_output_is_refused(world, adapter, tmp_path, command):
    """While a run holds its output folder (`adapter` checks that a finished run lets go of it), a second run into
    that folder stops before it writes anything."""
    out = tmp_path / "run"
    data = world.pairs if command == "train-dpo" else world.data
    argv = [command, "--model", world.model, "--data", data, "--image-dir", IMAGES, "--output", out, *TRAIN,
            "--max-steps", "1"]
    out.mkdir()
    with open(out / ".stic.lock", "w") as holder:  # what the first run holds while it trains
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_stic(*argv, check=False)
    assert_clean_failure(proc, f"--output {out} is being written by another run")
    assert sorted(p.name for p in out.iterdir()) == [".stic.lock"]


@pytest.fixture
def read_only_disk(small_disk):  # noqa: F811 (the fixture imported above)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, timeout=30)
    return small_disk


def test_a_full_disk_says_what_to_do_and_leaves_nothing(world, adapter, small_disk, tmp_path):  # noqa: F811
    fill(small_disk, leave_bytes=0)
    bench = eval_data.textvqa(tmp_path / "textvqa")
    runs = {
        "init-tiny": ["init-tiny", "--output", small_disk / "model"],
        "merge": ["merge", "--model", world.model, "--adapter", adapter, "--output", small_disk / "merged"],
        "eval": ["eval", "--model", world.model, "--benchmark", "textvqa", "--data", bench.path, "--output",
                 small_disk / "eval", "--limit", "1", *ONE_TOKEN],
        "describe": ["describe", "--model", world.model, "--data", world.data, "--image-dir", IMAGES, "--output",
                     small_disk / "d" / "d.jsonl", "--limit", "1", *ONE_TOKEN],
    }
    for name, argv in runs.items():
        proc = run_stic(*argv, check=False)
        assert_clean_failure(proc, "No space left on device", "free space on that disk")
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler"], f"{name} left {list(small_disk.iterdir())}"


def test_a_read_only_disk_says_what_to_do_and_leaves_nothing(world, read_only_disk):
    runs = {
        "init-tiny": ["init-tiny", "--output", read_only_disk / "model"],
        "prefs": ["prefs", "--model", world.model, "--image-dir", IMAGES, "--images", world.list, "--output",
                  read_only_disk / "p.jsonl", *ONE_TOKEN],
        "train-dpo": ["train-dpo", "--model", world.model, "--data", world.pairs, "--image-dir", IMAGES, "--output",
                      read_only_disk / "run", *TRAIN, "--max-steps", "1"],
    }
    for name, argv in runs.items():
        proc = run_stic(*argv, check=False)
        assert_clean_failure(proc, "Read-only file system", "mounted read-only")
        assert list(read_only_disk.iterdir()) == [], name


# ---------------------------------------------------------------- out of memory
def test_out_of_memory_says_which_flags_lower_it_and_leaves_nothing(world, tmp_path):
    """An allocation libtorch cannot make (here: address space capped at 6 GB, long rows of attention scores)
    ends with exit 2 and the flags that lower the memory, not with a panic and its C++ backtrace."""
    data = write_pairs(tmp_path / "long_pairs.jsonl", n=4, chosen="word " * 8000)
    out = tmp_path / "out"
    argv = [str(ROOT / "target" / "release" / "stic"), "train-dpo", "--model", world.model, "--data", data,
            "--image-dir", IMAGES, "--output", out, *CPU, "--lora-r", "2", "--grad-accum", "1",
            "--max-length", "8192", "--batch-size", "100000"]
    limit = 6 * 2**30
    proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert_clean_failure(proc, "error: out of memory: DefaultCPUAllocator: can't allocate memory",
                         "halve --batch-size", "--grad-accum", "--max-length", "--gradient-checkpointing true")
    assert "frame #" not in proc.stderr, proc.stderr
    assert not out.exists(), "the run left its output folder behind"
