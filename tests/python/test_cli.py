"""The command line explains itself: help text and defaults on every flag (config defaults included), listed
choices, shell completions and man pages; models by hub id from the local Hugging Face cache; the JSON summaries
of `prefs`, `describe` and `reproduce`."""
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import IMAGES, ROOT, STIC, run_stic

SAMPLE = Path(__file__).parent / "data" / "llava_sample.json"
GEN = ["--device", "cpu", "--seed", "42", "--max-new-tokens", "4"]


@functools.lru_cache(maxsize=None)
def subcommands():
    """The visible subcommands, as `stic --help` lists them."""
    text = run_stic("--help").stdout
    block = text.split("Commands:\n", 1)[1].split("\n\n", 1)[0]
    names = [line.split()[0] for line in block.splitlines() if line.startswith("  ") and line.split()]
    return tuple(n for n in names if n != "help")


def flags(help_text):
    """{flag: description} of a `--help` text, whether clap put the description on the flag's line or below."""
    out, current = {}, None
    for line in help_text.split("Options:\n", 1)[1].splitlines():
        m = re.match(r"^\s{2,6}(?:-\w, )?(--[\w-]+)(?: <[^>]+>(?:\.\.\.)?)?(?:\s{2,}(.*))?$", line)
        if m:
            current = m.group(1)
            out[current] = (m.group(2) or "").strip()
        elif current and line.startswith(" " * 10) and line.strip():  # also after a blank line: the choices
            out[current] = (out[current] + " " + line.strip()).strip()
    return out


@functools.lru_cache(maxsize=None)
def help_of(sub):
    return run_stic(sub, "--help").stdout


def test_the_commands_are_listed():
    assert {"generate", "prefs", "describe", "eval", "train-dpo", "train-sft", "reproduce", "completions", "man"} <= set(subcommands())


def test_every_flag_of_every_command_has_help():
    missing = []
    for sub in subcommands():
        for flag, description in flags(help_of(sub)).items():
            text = re.sub(r"\[(default|possible values): [^\]]*\]", "", description).strip()
            if len(text) < 8:
                missing.append(f"stic {sub} {flag}: {description!r}")
    assert not missing, "\n".join(missing)


# flags whose value has a default or is one of a closed set: the help must say which
WITH_DEFAULT = {
    "generate": ["--template", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--dtype",
                 "--device", "--batch-size", "--gpu-memory-fraction", "--prefill-chunk", "--processing"],
    "prefs": ["--corruption", "--resize-filter", "--seed", "--batch-size", "--dtype", "--device", "--max-new-tokens",
              "--temperature", "--template"],
    "describe": ["--seed", "--dtype", "--device", "--max-new-tokens", "--temperature", "--template"],
    "eval": ["--benchmark", "--template", "--description-max-new-tokens", "--dtype", "--device", "--judge-key-env",
             "--judge-runs"],
    "eval-score": ["--benchmark", "--judge-runs"],
    "corrupt": ["--kind", "--seed"],
    "reproduce": ["--profile", "--benchmarks"],
    "train-dpo": ["--lr", "--projector-lr", "--epochs", "--lora-r", "--lora-alpha", "--lora-dropout", "--batch-size",
                  "--grad-accum", "--max-length", "--save-steps", "--seed", "--device", "--dtype",
                  "--gradient-checkpointing", "--beta", "--alpha", "--loss-type", "--rejected-scoring"],
    "train-sft": ["--lr", "--projector-lr", "--epochs", "--lora-r", "--lora-alpha", "--lora-dropout", "--batch-size",
                  "--grad-accum", "--max-length", "--save-steps", "--seed", "--device", "--dtype"],
    "dist-check": ["--device"],
    "init-tiny": ["--seed"],
}
CHOICES = {
    "generate": ["--template", "--dtype", "--processing"],
    "eval": ["--benchmark", "--template", "--dtype"],
    "eval-score": ["--benchmark"],
    "corrupt": ["--kind"],
    "reproduce": ["--profile", "--benchmarks"],
    "train-dpo": ["--loss-type", "--rejected-scoring", "--dtype"],
    "prefs": ["--corruption", "--resize-filter", "--template"],
    "describe": ["--template"],
}


def test_defaults_and_choices_are_shown():
    problems = []
    for sub, names in WITH_DEFAULT.items():
        shown = flags(help_of(sub))
        for flag in names:
            if "[default: " not in shown[flag] and "[possible values: " not in shown[flag]:
                problems.append(f"stic {sub} {flag} shows no default: {shown[flag]!r}")
        for flag in CHOICES.get(sub, []):
            if "[possible values: " not in shown[flag]:
                problems.append(f"stic {sub} {flag} lists no choices: {shown[flag]!r}")
    assert not problems, "\n".join(problems)
    benchmarks = flags(help_of("eval"))["--benchmark"]
    assert "scienceqa" in benchmarks and "mm-vet" in benchmarks and "mathvista" in benchmarks
    profiles = sorted(p.parent.name for p in (ROOT / "configs").glob("*/reproduce.yaml"))
    assert f"[possible values: {', '.join(profiles)}]" in flags(help_of("reproduce"))["--profile"]


def config_default(description, config):
    m = re.search(r"\[default: (\S+) from (\S+)\]", description)
    assert m, description
    assert m.group(2) == config, description
    return m.group(1)


@pytest.mark.parametrize("sub, config", [("train-dpo", "configs/paper/stage1.yaml"), ("train-sft", "configs/paper/stage2.yaml")])
def test_train_help_shows_the_shipped_config(sub, config):
    cfg = yaml.safe_load((ROOT / config).read_text())
    shown = flags(help_of(sub))
    numbers = {"--lr": cfg["lr"], "--projector-lr": cfg["projector_lr"], "--epochs": cfg["epochs"],
               "--lora-r": cfg["lora"]["r"], "--lora-alpha": cfg["lora"]["alpha"], "--lora-dropout": cfg["lora"]["dropout"],
               "--batch-size": cfg["batch_size"], "--grad-accum": cfg["grad_accum"], "--max-length": cfg["max_length"],
               "--save-steps": cfg["save_steps"], "--seed": cfg["seed"]}
    if sub == "train-dpo":
        numbers.update({"--beta": cfg["dpo"]["beta"], "--alpha": cfg["dpo"]["alpha"]})
        assert config_default(shown["--loss-type"], config) == cfg["dpo"]["loss_type"]
        assert config_default(shown["--rejected-scoring"], config) == cfg["dpo"]["rejected_scoring"]
    for flag, value in numbers.items():
        assert float(config_default(shown[flag], config)) == float(value), (flag, shown[flag])
    assert config_default(shown["--gradient-checkpointing"], config) == str(cfg["gradient_checkpointing"]).lower()
    if sub == "train-dpo":
        assert "[default: 1e-7 from configs/paper/stage1.yaml]" in shown["--lr"]
        assert "[default: 0.1 from configs/paper/stage1.yaml]" in shown["--beta"]


def test_generation_job_help_shows_the_shipped_prompts_file():
    generation = json.loads((ROOT / "third_party" / "stic" / "prompts.json").read_text())["generation"]
    for sub in ["prefs", "describe"]:
        shown = flags(help_of(sub))
        assert int(config_default(shown["--max-new-tokens"], "third_party/stic/prompts.json")) == generation["max_new_tokens"]
        assert float(config_default(shown["--temperature"], "third_party/stic/prompts.json")) == generation["temperature"]


@pytest.mark.parametrize("args, needle", [
    (["eval", "--benchmark", "nope", "--model", "m", "--data", "d", "--output", "o"], "scienceqa"),
    (["generate", "--model", "m", "--dtype", "f64", "--prompt", "x"], "bf16"),
    (["generate", "--model", "m", "--template", "chatml", "--prompt", "x"], "vicuna_v1"),
    (["train-dpo", "--model", "m", "--data", "d", "--image-dir", "i", "--output", "o", "--loss-type", "kto"], "ipo"),
    (["reproduce", "--profile", "nope"], "official"),
    (["corrupt", "--image", "a", "--output", "b", "--kind", "blur"], "color_jitter"),
    (["completions", "tcsh"], "bash"),
])
def test_an_invalid_choice_exits_2_listing_the_choices(args, needle):
    proc = run_stic(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "possible values" in proc.stderr and needle in proc.stderr, proc.stderr


def test_an_unknown_device_exits_2_saying_what_it_takes():
    proc = run_stic("generate", "--model", "m", "--device", "gpu", "--prompt", "x", check=False)
    assert proc.returncode == 2 and "cuda:N" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- sample-images

def test_sample_images_draws_a_seeded_list_that_extends_and_refuses_a_count_above_the_folder(tmp_path):
    images = tmp_path / "train2014"
    images.mkdir()
    names = [f"COCO_train2014_{k:012}.jpg" for k in range(40)]
    for name in names:
        (images / name).touch()
    (images / "readme.txt").touch()

    def sample(output, count, seed=42, *extra, check=True):
        proc = run_stic("sample-images", "--image-dir", images, "--count", count, "--seed", seed,
                        "--output", tmp_path / output, *extra, check=check)
        return proc if not check else json.loads((tmp_path / output).read_text())

    six = sample("6.json", 6)
    assert len(set(six)) == 6 and set(six) <= set(names)
    assert sample("6_again.json", 6) == six
    assert sample("6_seed_7.json", 6, 7) != six
    assert sample("12.json", 12)[:6] == six, "a larger count extends a smaller one"
    rest = sample("rest.json", 34, 42, "--exclude", tmp_path / "6.json")
    assert sorted(six + rest) == names

    before = (tmp_path / "6.json").read_bytes()
    for output, count, extra, needle in [
        ("35.json", 35, ["--exclude", tmp_path / "6.json"], "--count 35 is more than the 34 images"),
        ("6.json", 1, ["--exclude", tmp_path / "6.json"], "writing it would destroy that input"),
        ("none.json", 1, ["--exclude", tmp_path / "missing.json"], "missing.json"),
    ]:
        proc = sample(output, count, 42, *extra, check=False)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "35.json").exists() and not (tmp_path / "none.json").exists()
    assert (tmp_path / "6.json").read_bytes() == before


# ---------------------------------------------------------------- completions and man pages

def test_bash_completion_is_valid_bash_naming_every_command(tmp_path):
    script = run_stic("completions", "bash").stdout
    path = tmp_path / "stic.bash"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    for sub in subcommands():
        assert sub in script, sub
    assert "--lora-alpha" in script and "--benchmark" in script
    for shell in ["zsh", "fish", "elvish", "powershell"]:
        assert "train-dpo" in run_stic("completions", shell).stdout, shell


def test_man_pages(tmp_path):
    page = run_stic("man").stdout
    assert page.startswith(".ie") or ".TH stic 1" in page
    assert ".TH stic 1" in page and ".SH NAME" in page and ".SH SUBCOMMANDS" in page
    for sub in subcommands():
        escaped = sub.replace("-", "\\-")
        assert f"stic\\-{escaped}(1)" in page, sub
    out = tmp_path / "man"
    run_stic("man", "--output", out)
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["stic.1"] + [f"stic-{sub}.1" for sub in subcommands()]), written
    dpo = (out / "stic-train-dpo.1").read_text()
    assert ".TH stic-train-dpo 1" in dpo and "lora\\-alpha" in dpo and "configs/paper/stage1.yaml" in dpo
    if shutil.which("groff"):
        rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(out / "stic-train-dpo.1")],
                                  capture_output=True, text=True, check=True)
        text = re.sub(".\x08", "", rendered.stdout).replace("\u2010", "-").replace("\u2212", "-")
        assert "--lora-alpha" in text and "[default: 1e-7 from configs/paper/stage1.yaml]" in text, text[:2000]
        assert "warning" not in rendered.stderr.lower(), rendered.stderr


# ---------------------------------------------------------------- models by hub id

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    run_stic("init-tiny", "--output", out, timeout=120)
    return out


def fake_hub_cache(root, model, repo="owner/tiny", commit="0123456789abcdef0123456789abcdef01234567"):
    """`model` in the hub cache's layout: blobs, a snapshot of symlinks into them, refs/main."""
    owner, name = repo.split("/")
    folder = root / f"models--{owner}--{name}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(model.iterdir())):
        blob = folder / "blobs" / f"blob{i:04d}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def stic_env(*args, env):
    return subprocess.run([str(STIC), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_a_hub_id_loads_from_the_hf_cache(tiny, tmp_path):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, tiny)
    args = ["generate", "--image", IMAGES / "chelsea.png", "--prompt", "What is this?", "--max-new-tokens", "5",
            "--device", "cpu"]
    expected = run_stic("generate", "--model", tiny, *args[1:]).stdout
    proc = stic_env(args[0], "--model", "owner/tiny", *args[1:], env={"HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected
    # HF_HOME/hub when HF_HUB_CACHE is not set, and a revision by commit hash
    env = {"HF_HUB_CACHE": "", "HF_HOME": str(tmp_path)}
    proc = stic_env(args[0], "--model", "owner/tiny@0123456789abcdef0123456789abcdef01234567", *args[1:], env=env)
    assert proc.returncode == 0 and proc.stdout == expected, proc.stderr


def test_random_weights_tiny_is_the_init_tiny_model_of_the_seed(tmp_path):
    """`--random-weights tiny --seed S` builds in memory the weights `init-tiny --seed S` writes: the same greedy
    tokens, in f32 and bf16; another seed gives another model."""
    model = tmp_path / "model"
    run_stic("init-tiny", "--output", model, "--seed", "3", timeout=120)
    args = ["--image", IMAGES / "chelsea.png", "--prompt", "What is this?", "--max-new-tokens", "8", "--device",
            "cpu", "--json"]
    tokens = lambda *flags: json.loads(run_stic("generate", *flags, *args).stdout)["tokens"]
    for dtype in ["f32", "bf16"]:
        expected = tokens("--model", model, "--seed", "3", "--dtype", dtype)
        assert tokens("--random-weights", "tiny", "--seed", "3", "--dtype", dtype) == expected
    assert tokens("--random-weights", "tiny", "--seed", "4") != tokens("--model", model)
    proc = run_stic("generate", "--random-weights", "tiny", "--model", model, *args, check=False)
    assert proc.returncode == 2 and "cannot be used with" in proc.stderr


def test_a_hub_id_not_in_the_cache_says_how_to_download_it(tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    proc = stic_env("generate", "--model", "llava-hf/llava-v1.6-mistral-7b-hf", "--image", IMAGES / "chelsea.png",
                    "--prompt", "x", env={"HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 2, proc.stderr
    for needle in [str(cache), "huggingface-cli download llava-hf/llava-v1.6-mistral-7b-hf`",
                   "hf download llava-hf/llava-v1.6-mistral-7b-hf", "HF_HUB_CACHE"]:
        assert needle in proc.stderr, proc.stderr
    proc = stic_env("merge", "--model", "a/b", "--adapter", "c/d", "--output", tmp_path / "o", env={"HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 2 and "huggingface-cli download a/b" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- JSON summaries

def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_prefs_summary_counts_what_it_wrote_and_skipped(tiny, tmp_path):
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps(["chelsea.png", "nope.jpg", "coffee.png"]))
    out = tmp_path / "prefs.jsonl"
    proc = run_stic("prefs", "--model", tiny, "--image-dir", IMAGES, "--images", listing, "--output", out, *GEN,
                    "--json")
    summary = json.loads((tmp_path / "prefs.summary.json").read_text())
    assert json.loads(proc.stdout) == summary
    records = read_jsonl(out)
    assert summary["written"] == len(records) == 2
    assert summary["already_done"] == 0 and summary["skipped"] == 1
    assert len(summary["skipped_reasons"]) == 1 and "nope.jpg" in summary["skipped_reasons"][0]
    assert summary["output"] == str(out) and summary["seconds"] > 0
    assert summary["generated_tokens"] > 0 and summary["tokens_per_second"] > 0
    assert summary["images_encoded"] >= 2
    # a rerun finds them there; without --json stdout stays empty
    proc = run_stic("prefs", "--model", tiny, "--image-dir", IMAGES, "--images", listing, "--output", out, *GEN)
    assert proc.stdout == ""
    summary = json.loads((tmp_path / "prefs.summary.json").read_text())
    assert (summary["written"], summary["already_done"], summary["skipped"]) == (0, 2, 1)


def test_describe_summary_matches_its_output(tiny, tmp_path):
    entries = json.loads(SAMPLE.read_text())
    out = tmp_path / "d.jsonl"
    proc = run_stic("describe", "--model", tiny, "--data", SAMPLE, "--image-dir", IMAGES, "--output", out, *GEN,
                    "--json")
    summary = json.loads(proc.stdout)
    assert summary == json.loads((tmp_path / "d.summary.json").read_text())
    assert summary["written"] == len(read_jsonl(out)) == sum(1 for e in entries if e.get("image"))
    assert summary["skipped"] == 0 and summary["skipped_reasons"] == []
    assert summary["context_stops"] == len(summary["context_stopped_keys"])


def test_reproduce_summary_lists_the_steps_run_and_skipped(tiny, tmp_path):
    """The paper profile up to its first step (prefs), with short responses, run twice."""
    profile = yaml.safe_load((ROOT / "configs" / "paper" / "reproduce.yaml").read_text())
    profile["generation"]["max_new_tokens"] = 4
    config = tmp_path / "reproduce.yaml"
    config.write_text(yaml.safe_dump(profile))
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(IMAGES / "chelsea.png", images)
    (tmp_path / "stage1.json").write_text(json.dumps(["chelsea.png"]))
    env = {**os.environ, "STIC_MODEL": str(tiny), "STIC_COCO_DIR": str(images),
           "STIC_STAGE1_IMAGES": str(tmp_path / "stage1.json"), "STIC_OUTPUT": str(tmp_path / "run"),
           "STIC_REPORT": str(tmp_path / "report" / "reproduce")}
    args = [str(STIC), "reproduce", "--config", config, "--until", "prefs", "--json"]
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "run" / "reproduce_summary.json").read_text())
    assert json.loads(first.stdout.splitlines()[-1]) == summary
    assert (summary["profile"], summary["steps_run"], summary["steps_skipped"]) == ("paper", 1, 0)
    step = summary["steps"][0]
    assert step["name"] == "prefs" and step["ran"] and step["seconds"] > 0
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    again = json.loads(again.stdout)
    assert (again["steps_run"], again["steps_skipped"]) == (0, 1)
    assert again["steps"][0] == {**step, "ran": False}
    assert again["reports"] == []
