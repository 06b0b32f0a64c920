"""`stic reproduce` and the switches of its two profiles (configs/official, configs/paper), on the tiny random model.

The shipped profiles run as they are: only their paths change (through the STIC_* environment variables) and the
data is small (one stage-1 image, a two-entry instruction set, a ScienceQA folder of two questions and an MMBench
folder of one), on COCO-sized JPEGs made from the real photos of data/images (640x480, 480x640, 640x427, 500x375,
300x200). Each switch is also checked for its effect, with the shipped stage configs.
"""
import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

import tiny_models
from conftest import IMAGES, ROOT, STIC, official_pref_to_sft, run_stic
from eval_data import MMBENCH_HEADER

TIMEOUT = 900
IMAGE_ID = 32000
PROFILES = ["official", "paper"]
# The profiles for the paper's other base models: name -> (hub id of the model, its separate CLIP tower).
OTHER_BASE_MODELS = {
    "official-llava-v1.5-7b": ("liuhaotian/llava-v1.5-7b", "openai/clip-vit-large-patch14-336"),
    "paper-llava-v1.5-7b": ("liuhaotian/llava-v1.5-7b", "openai/clip-vit-large-patch14-336"),
    "official-llava-v1.6-vicuna-13b": ("liuhaotian/llava-v1.6-vicuna-13b", None),
    "paper-llava-v1.6-vicuna-13b": ("llava-hf/llava-v1.6-vicuna-13b-hf", None),
}
# COCO sizes: (file, source photo, width, height)
COCO_SIZES = [("wide.jpg", "waterview.jpg", 640, 480), ("tall.jpg", "waterview.jpg", 480, 640),
              ("rocket.jpg", "rocket.jpg", 640, 427), ("coffee.jpg", "coffee.png", 500, 375),
              ("small.jpg", "chelsea.png", 300, 200)]


def coco_sized(photo, width, height):
    """The photo centre-cropped to the aspect ratio and resized: a COCO-sized RGB image."""
    img = Image.open(IMAGES / photo).convert("RGB")
    scale = max(width / img.width, height / img.height)
    w, h = round(width / scale), round(height / scale)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)


def assert_clean_failure(proc, *needles):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "panicked" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model and small data sets in the layouts the profiles read."""
    root = tmp_path_factory.mktemp("reproduce")
    images = root / "images"
    images.mkdir()
    for name, photo, w, h in COCO_SIZES:
        coco_sized(photo, w, h).save(images / name, quality=90)
    run_stic("init-tiny", "--output", root / "model")
    (root / "stage1.json").write_text(json.dumps(["wide.jpg"]))
    instructions = [
        {"id": "a", "image": "rocket.jpg", "conversations": [
            {"from": "human", "value": "What is in the sky?\n<image>"}, {"from": "gpt", "value": "A rocket."},
            {"from": "human", "value": "Is it day?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "b", "image": "coffee.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the cup?"}, {"from": "gpt", "value": "Coffee."}]},
    ]
    (root / "instructions.json").write_text(json.dumps(instructions))
    sqa = root / "eval" / "scienceqa"
    (sqa / "images" / "test" / "1").mkdir(parents=True)
    coco_sized("chelsea.png", 300, 200).save(sqa / "images" / "test" / "1" / "image.jpg", quality=90)
    (sqa / "llava_test_CQM-A.json").write_text(json.dumps([
        {"id": "1", "image": "1/image.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhich animal is shown?\nA. dog\nB. cat"}, {"from": "gpt", "value": "B"}]},
        {"id": "2", "conversations": [
            {"from": "human", "value": "Which word comes first in alphabetical order?\nA. cat\nB. dog"},
            {"from": "gpt", "value": "A"}]},
    ]))
    mmb = root / "eval" / "mmbench"
    mmb.mkdir()
    photo = base64.b64encode((images / "tall.jpg").read_bytes()).decode()
    row = [0, "What is shown?", "nan", "a lake", "a desert", "a city", "", "A", "scene", photo, "synthetic",
           "coarse_perception", "nan", "dev"]
    (mmb / "mmbench_dev_20230712.tsv").write_text("\t".join(MMBENCH_HEADER) + "\n" + "\t".join(map(str, row)) + "\n")
    return root


def env_for(world, out, **override):
    env = dict(os.environ)
    env.update({
        "STIC_MODEL": str(world / "model"), "STIC_COCO_DIR": str(world / "images"),
        "STIC_STAGE1_IMAGES": str(world / "stage1.json"), "STIC_INSTRUCTION_JSON": str(world / "instructions.json"),
        "STIC_INSTRUCTION_IMAGES": str(world / "images"), "STIC_EVAL_DIR": str(world / "eval"),
        "STIC_OUTPUT": str(out / "run"), "STIC_REPORT": str(out / "report" / "reproduce"),
    })
    env.update({k: str(v) for k, v in override.items()})
    return env


def original_env(world, tmp_path):
    """The environment of a run on a tiny original checkpoint as LLaVA's code writes it (vocabulary 32000, the
    slow tokenizer, no <image> token)."""
    original = tmp_path / "original"
    tiny_models.build_llava_original(original)
    return env_for(world, tmp_path, STIC_MODEL=original)


def reproduce(*args, env, timeout=TIMEOUT):
    return subprocess.run([str(STIC), "reproduce", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


# ------------------------------------------------------------------------------------------ the templates

def test_vicuna_v1_and_mistral_instruct_are_llava_conversation_py(world, tmp_path):
    """The rendered prompt of each template, tokenised, is LLaVA's `conv_templates[...]` prompt tokenised."""
    from llava.conversation import conv_templates
    tokenizer = tiny_models.tokenizer()
    for template in ["vicuna_v1", "mistral_instruct"]:
        out = tmp_path / f"{template}.safetensors"
        run_stic("score", "--model", world / "model", "--image", world / "images" / "small.jpg", "--prompt",
                 "What is this?", "--response", "A cat.", "--template", template, "--logits-out", out, "--device", "cpu")
        ids = load_file(out)["input_ids"].tolist()
        conv = conv_templates[template].copy()
        conv.append_message(conv.roles[0], "<image>\nWhat is this?")
        conv.append_message(conv.roles[1], "A cat.")
        expected = tokenizer(conv.get_prompt()).input_ids
        collapsed = [i for k, i in enumerate(ids) if i != IMAGE_ID or k == 0 or ids[k - 1] != IMAGE_ID]
        assert collapsed == expected, template
    assert "curious user" in conv_templates["vicuna_v1"].system and "user's" in conv_templates["vicuna_v1"].system


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("file,edit,key", [
    ("reproduce", lambda c: c.update(extra=1), "extra"),
    ("reproduce", lambda c: c["stage1"].update(corruptoin="apply"), "corruptoin"),
    ("reproduce", lambda c: c["eval"].update(judge="x"), "judge"),
    ("stage1", lambda c: c["lora"].update(droput=0.1), "droput"),
    ("stage1", lambda c: c["dpo"].update(bta=0.1), "bta"),
    ("stage2", lambda c: c.update(text_onyl=True), "text_onyl"),
])
@pytest.mark.parametrize("profile", PROFILES)
def test_unknown_key_anywhere_exits_2_naming_key_and_file(world, tmp_path, profile, file, edit, key):
    shipped = ROOT / "configs" / profile
    configs = {name: yaml.safe_load((shipped / f"{name}.yaml").read_text()) for name in ("reproduce", "stage1", "stage2")}
    edit(configs[file])
    for name in ("stage1", "stage2"):
        configs["reproduce"][name]["config"] = str(tmp_path / f"{name}.yaml")
    for name, cfg in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    bad = tmp_path / f"{file}.yaml"
    assert_clean_failure(reproduce("--config", tmp_path / "reproduce.yaml", "--plan", env=env_for(world, tmp_path)),
                         key, str(bad))
    if file != "reproduce":
        command = "train-dpo" if file == "stage1" else "train-sft"
        proc = run_stic(command, "--model", world / "model", "--data", world / "x.json", "--image-dir", world,
                        "--output", tmp_path / "o", "--config", bad, check=False)
        assert_clean_failure(proc, key, str(bad))


def test_unknown_profile_is_a_clear_error(world, tmp_path):
    proc = reproduce("--profile", "papr", "--plan", env=env_for(world, tmp_path))
    assert_clean_failure(proc, "invalid value 'papr' for '--profile",
                         "[possible values: official, official-llava-v1.5-7b, official-llava-v1.6-vicuna-13b, paper,")


def test_missing_input_stops_it_at_the_start_with_where_to_get_it(world, tmp_path):
    env = env_for(world, tmp_path, STIC_COCO_DIR=tmp_path / "no-coco", STIC_INSTRUCTION_JSON=tmp_path / "none.json")
    proc = reproduce("--profile", "official", "--benchmarks", "scienceqa", env=env)
    assert_clean_failure(proc, "cannot start", "coco_train2014", "images.cocodataset.org/zips/train2014.zip",
                         "mixed_5k.json", "drive.google.com", "STIC-LVLM/stic-llava-instruct-desc-5k")
    assert not (tmp_path / "run").exists(), "nothing may run before the inputs are there"
    env = env_for(world, tmp_path, STIC_INSTRUCTION_JSON=tmp_path / "none.json")
    assert_clean_failure(reproduce("--profile", "paper", "--benchmarks", "scienceqa", env=env),
                         "llava_v1_5_mix665k.json", "liuhaotian/LLaVA-Instruct-150K")


@pytest.mark.parametrize("profile", PROFILES)
def test_plan_lists_steps_reads_writes_and_what_is_missing(world, tmp_path, profile):
    proc = reproduce("--profile", profile, "--plan", "--benchmarks", "scienceqa,mmbench", env=env_for(world, tmp_path))
    assert proc.returncode == 0, proc.stderr
    dar_rows = 4 if profile == "paper" else 2  # the official DaR exists for MMBench only
    steps = 6 + 4 + dar_rows + 1
    assert f"{steps} steps" in proc.stdout
    for name in ["prefs", "train-dpo", "stage2-subset", "describe", "infuse", "train-sft", "eval-original-scienceqa",
                 "eval-stic_dar-mmbench", "report"]:
        assert f". {name} [to run]" in proc.stdout, name
    assert proc.stdout.count("reads:") == steps and proc.stdout.count("writes:") == steps
    assert ("eval-stic_dar-scienceqa" in proc.stdout) == (profile == "paper")
    official_args = ["--corruption flag-only", "--keep-duplicates", "--top-k 50", "--dtype f16", "--max-new-tokens 1024"]
    paper_args = ["--corruption apply", "--top-k 0", "--config configs/paper/stage1.yaml"]
    for arg in official_args if profile == "official" else paper_args:
        assert arg in proc.stdout, arg
    assert ("--keep-duplicates" in proc.stdout) == (profile == "official")
    assert not (tmp_path / "run").exists()
    if profile == "official":  # the world's model is a llava-hf checkpoint; the official profile wants the original
        assert "is not the checkpoint model.checkpoint asks for" in proc.stdout, proc.stdout
    else:
        assert "nothing is missing" in proc.stdout, proc.stdout


def stage1_row_config(tmp_path, profile):
    """The shipped profile with eval.stage1_row on (its relative paths stay relative to the repository root)."""
    cfg = yaml.safe_load((ROOT / "configs" / profile / "reproduce.yaml").read_text())
    cfg["eval"]["stage1_row"] = True
    path = tmp_path / "stage1_row.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_with_the_stage1_row_evaluates_the_stage1_adapter(world, tmp_path):
    env = env_for(world, tmp_path)
    config = stage1_row_config(tmp_path, "paper")
    proc = reproduce("--config", config, "--plan", "--benchmarks", "scienceqa,mmbench", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"{6 + 4 + 2 + 4 + 1} steps" in proc.stdout
    lines = proc.stdout.splitlines()
    names = [line.split(". ")[1].split(" ")[0] for line in lines if ". eval-" in line]
    assert names[2:6] == ["eval-original_dar-scienceqa", "eval-original_dar-mmbench", "eval-stage1-scienceqa",
                          "eval-stage1-mmbench"], names
    for bench in ("scienceqa", "mmbench"):
        k = next(k for k, line in enumerate(lines) if f". eval-stage1-{bench} [to run]: {bench}: stage 1 only" in line)
        command = lines[k + 1].split()
        assert command[command.index("--adapter") + 1] == str(tmp_path / "run" / "stage1" / "adapter")
        assert "--dar" not in command
        assert str(tmp_path / "run" / "eval" / "stage1" / bench) in lines[k + 3]
    proc = reproduce("--config", config, "--plan", "--until", "eval-stage1-mmbench", env=env)
    assert ". eval-stage1-mmbench [to run]" in proc.stdout and ". eval-stic-scienceqa [after --until]" in proc.stdout


@pytest.mark.parametrize("profile", sorted(OTHER_BASE_MODELS))
def test_plan_of_another_base_model_lists_what_to_fetch_and_its_template(world, tmp_path, profile):
    """Each profile says its model; the v1.5 ones also the CLIP tower their checkpoint lacks (missing until it is in
    the Hugging Face cache); prefs and describe get llava_v1, generate_pref.py's pick for a "v1" name."""
    hub, tower = OTHER_BASE_MODELS[profile]
    cache = tmp_path / "hub"
    env = env_for(world, tmp_path, HF_HUB_CACHE=cache)
    proc = reproduce("--profile", profile, "--plan", "--benchmarks", "scienceqa", env=env)
    assert proc.returncode == 0, proc.stderr
    fetch = proc.stdout.split("\n  1. ")[0]
    assert f"  model: {world / 'model'}: huggingface.co/{hub} " in fetch, fetch
    for key in ("coco_train2014", "instruction_json", "instruction_images", "eval_root"):
        assert f"  {key}: " in fetch, key
    assert ("  tower: " in fetch) == (tower is not None), fetch
    commands = [line for line in proc.stdout.splitlines() if "command: stic prefs" in line or "command: stic describe" in line]
    assert len(commands) == 2 and all("--template llava_v1" in c for c in commands), commands
    kind = profile.split("-")[0]
    assert f"--config configs/{kind}/stage1.yaml" in proc.stdout, "the stage configs of the profile it extends"
    missing = proc.stdout.split("missing (a run stops")[-1]
    if tower:
        assert f"  tower: {tower} is neither a folder nor in the Hugging Face cache" in missing, missing
        assert f"huggingface-cli download {tower}" in missing
        assert f"  tower: {tower} (a folder, or the Hugging Face cache): " in fetch, fetch
        snapshot = cache / f"models--{tower.replace('/', '--')}" / "snapshots" / "0"
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        proc = reproduce("--profile", profile, "--plan", "--benchmarks", "scienceqa", env=env)
        assert proc.returncode == 0 and "  tower: " not in proc.stdout.split("missing (a run stops")[-1], proc.stdout
        assert f"  tower: {tower} (found: {snapshot}): " in proc.stdout.split("\n  1. ")[0], proc.stdout
    else:
        assert "  tower: " not in missing


@pytest.mark.parametrize("profile", PROFILES)
def test_plan_passes_the_official_textvqa_limit_and_mmbench_options(world, tmp_path, profile):
    """scripts/eval/textvqa.sh runs model_vqa_loader.py, whose --max_new_tokens defaults to 128 (the other official
    scripts pass 1024); model_vqa_mmbench.py lists the options get_options returns."""
    proc = reproduce("--profile", profile, "--plan", "--benchmarks", "scienceqa,textvqa,mmbench",
                     env=env_for(world, tmp_path))
    assert proc.returncode == 0, proc.stderr
    commands = {}
    for step, line in zip(proc.stdout.splitlines(), proc.stdout.splitlines()[1:]):
        if ". eval-" in step and "command:" in line:
            commands[step.split(". ")[1].split(" ")[0]] = line.split("command: ")[1].split(" ")
    assert set(commands) >= {"eval-original-textvqa", "eval-stic-textvqa", "eval-original-mmbench"}

    def flag(step, name):
        args = commands[step]
        return args[args.index(name) + 1] if name in args else None
    for row in ("original", "stic"):
        expected = ("128", "1024", "1024", "official") if profile == "official" else (None, None, None, None)
        assert (flag(f"eval-{row}-textvqa", "--max-new-tokens"), flag(f"eval-{row}-scienceqa", "--max-new-tokens"),
                flag(f"eval-{row}-mmbench", "--max-new-tokens"),
                flag(f"eval-{row}-mmbench", "--mmbench-options")) == expected
    assert all(flag(step, "--mmbench-options") is None for step in commands if "mmbench" not in step)


# ------------------------------------------------------------------------------------------ both profiles, end to end

@pytest.mark.parametrize("profile,runs", [("official", None), ("paper", "3")])
def test_plan_asks_the_profile_judge_runs_for_llava_bench(world, tmp_path, profile, runs):
    """eval.judge_runs: the paper profile reviews LLaVA-Bench in 3 judge runs (Fig. 4), the official one once."""
    config = yaml.safe_load((ROOT / "configs" / profile / "reproduce.yaml").read_text())
    config["eval"]["judge_url"] = "http://127.0.0.1:9/v1"
    path = tmp_path / "judged.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = reproduce("--config", path, "--plan", "--benchmarks", "llava-bench,mm-vet", env=env_for(world, tmp_path))
    assert proc.returncode == 0, proc.stderr
    commands = [line.split("command: stic ")[1].split(" ") for line in proc.stdout.splitlines() if "command: stic eval" in line]
    for args in commands:
        value = args[args.index("--judge-runs") + 1] if "--judge-runs" in args else None
        assert value == (runs if args[args.index("--benchmark") + 1] == "llava-bench" else None), args
    assert any(args[args.index("--benchmark") + 1] == "llava-bench" for args in commands)


def test_plan_passes_the_profile_dar_prompt_to_the_dar_rows(world, tmp_path):
    """eval.dar_prompt (the paper's Table 9): the DaR rows describe with it, the others do not pass it."""
    config = yaml.safe_load((ROOT / "configs" / "paper" / "reproduce.yaml").read_text())
    config["eval"]["dar_prompt"] = "Describe the image."
    path = tmp_path / "dar_prompt.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = reproduce("--config", path, "--plan", "--benchmarks", "scienceqa", env=env_for(world, tmp_path))
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if "command: stic eval" in line]
    assert len(commands) == 4
    for line in commands:
        assert ("--dar-prompt Describe the image." in line) == (" --dar " in line), line
    config["eval"]["dar_prompt"] = "  "
    path.write_text(yaml.safe_dump(config))
    assert_clean_failure(reproduce("--config", path, "--plan", env=env_for(world, tmp_path)), "eval.dar_prompt is empty")


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_killed_then_resumed(world, tmp_path, profile, *extra):
    """Starts the run, kills it once the first step is done, and runs it again to the end."""
    env = env_for(world, tmp_path)
    args = [str(STIC), "reproduce", "--profile", profile, "--benchmarks", "scienceqa,mmbench", *map(str, extra)]
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "run" / ".steps" / "prefs.json"
    deadline = time.time() + TIMEOUT
    while not marker.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert marker.exists(), first.stderr.read()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "prefs: done before, skipped" in proc.stderr
    assert "[2/" in proc.stderr and "ETA" in proc.stderr and "elapsed" in proc.stderr
    return proc


MISTRAL_SCIENCEQA = {"original": 68.9, "stic_dar": 75.3}  # the paper's Table 2


def check_report(tmp_path, profile, paper_scienceqa=MISTRAL_SCIENCEQA):
    report = json.loads((tmp_path / "report" / "reproduce.json").read_text())
    assert report["profile"] == profile
    for bench in ["scienceqa", "mmbench"]:
        measured = report["benchmarks"][bench]["measured"]
        assert set(measured) == {"original", "original_dar", "stic", "stic_dar"}
        assert isinstance(measured["original"], float) and isinstance(measured["stic"], float)
    dar = report["benchmarks"]["scienceqa"]["measured"]["original_dar"]
    assert (dar == "not in profile") == profile.startswith("official")
    assert report["benchmarks"]["scienceqa"]["paper"] == paper_scienceqa
    markdown = (tmp_path / "report" / "reproduce.md").read_text()
    assert "| scienceqa |" in markdown and "DaR gain" in markdown and "training gain" in markdown
    png = Image.open(tmp_path / "report" / "reproduce.png")
    assert png.format == "PNG" and png.size == (1400, 640)


def test_paper_profile_runs_to_the_end_and_resumes_after_a_kill(world, tmp_path):
    proc = run_killed_then_resumed(world, tmp_path, "paper")
    run = tmp_path / "run"
    prefs = records(run / "stage1" / "prefs.jsonl")
    assert [r["image"] for r in prefs] == ["wide.jpg"]
    for r in prefs:
        assert (r["corruption"] is not None) == r["image_corruption"]  # applied, not only flagged
    # Anyres features of COCO sizes and 1,024-token responses: nothing is cut at max_length 4096 / 4416.
    assert "0 responses truncated to max_length 4096" in proc.stderr, proc.stderr
    assert "0 responses truncated to max_length 4416" in proc.stderr
    adapter = load_file(run / "stage1" / "adapter" / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k for k in adapter)
    assert (run / "stage2" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(json.loads((run / "stage2" / "instructions.json").read_text())) == 2
    # A done step whose command the profile no longer gives is not silently reused.
    changed = yaml.safe_load((ROOT / "configs" / "paper" / "reproduce.yaml").read_text())
    changed["generation"]["top_k"] = 5
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    assert_clean_failure(reproduce("--config", tmp_path / "changed.yaml", "--plan", env=env_for(world, tmp_path)),
                         "step prefs was done with another command line", "prefs.jsonl")
    check_report(tmp_path, "paper")
    # The stage-1 row turned on after the run: only its evaluations and the report run.
    proc = reproduce("--config", stage1_row_config(tmp_path, "paper"), "--benchmarks", "scienceqa,mmbench",
                     env=env_for(world, tmp_path))
    assert proc.returncode == 0, proc.stderr
    ran = [line.split("] ", 1)[1].split(" done in ")[0] for line in proc.stderr.splitlines()
           if line.startswith("[") and " done in " in line]
    assert ran == ["eval-stage1-scienceqa", "eval-stage1-mmbench", "report"], proc.stderr
    report = json.loads((tmp_path / "report" / "reproduce.json").read_text())
    for bench in ["scienceqa", "mmbench"]:
        measured = report["benchmarks"][bench]["measured"]
        assert list(measured) == ["original", "original_dar", "stage1", "stic", "stic_dar"]
        assert isinstance(measured["stage1"], float)
    assert report["benchmarks"]["scienceqa"]["paper"] == {"original": 68.9, "stage1": None, "stic_dar": 75.3}
    assert "| original + DaR | stage 1 only | STIC |" in (tmp_path / "report" / "reproduce.md").read_text()


def test_official_profile_runs_to_the_end(world, tmp_path):
    env = original_env(world, tmp_path)
    proc = reproduce("--profile", "official", "--benchmarks", "scienceqa,mmbench", env=env)
    assert proc.returncode == 0, proc.stderr
    prefs = records(tmp_path / "run" / "stage1" / "prefs.jsonl")
    assert all(r["corruption"] is None for r in prefs)
    assert "image features per example 0-0" in proc.stderr  # stage 1 is text only
    check_report(tmp_path, "official")


def test_official_llava_v15_profile_runs_to_the_end(world, tmp_path):
    """LLaVA-v1.5-7b as liuhaotian ships it, built by LLaVA's code: pickle shards without the tower, the tower in
    its own folder (mm_vision_tower), the Llama decoder, pad to one 576-feature tile; llava_v1 for generation."""
    original = tmp_path / "llava-v1.5-7b"
    tiny_models.build_llava_llama_original(
        original, tower_inside=False, tower_name=None, image_aspect_ratio="pad", mm_patch_merge_type="flat",
        save_kwargs={"safe_serialization": False, "max_shard_size": "6MB"})
    assert not list(original.glob("*.safetensors")) and list(original.glob("pytorch_model-*.bin"))
    env = env_for(world, tmp_path, STIC_MODEL=original)
    proc = reproduce("--profile", "official-llava-v1.5-7b", "--benchmarks", "scienceqa,mmbench", env=env)
    assert proc.returncode == 0, proc.stderr
    for step in ["prefs", "describe"]:
        args = json.loads((tmp_path / "run" / ".steps" / f"{step}.json").read_text())["command"]
        assert args[args.index("--template") + 1] == "llava_v1", args
    assert "image features per example 0-0" in proc.stderr  # stage 1 is text only, as in the official profile
    check_report(tmp_path, "official-llava-v1.5-7b", paper_scienceqa=None)  # Table 1 not entered


# ------------------------------------------------------------------------------------------ each switch, its effect

def pairs_file(world, tmp_path, response_words=6):
    lines = []
    for name in ["wide.jpg", "tall.jpg"]:
        turn = lambda text: [{"role": "user", "content": "Illustrate the details of the picture."},  # noqa: E731
                             {"role": "assistant", "content": text}]
        lines.append({"image": name, "chosen": turn("a lake under a clear sky " * response_words),
                      "rejected": turn("a dragon flies over a castle " * response_words)})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def dump_first_step(world, tmp_path, config, name):
    out = tmp_path / f"{name}.safetensors"
    proc = run_stic("train-dpo", "--model", world / "model", "--data", pairs_file(world, tmp_path), "--image-dir",
                    world / "images", "--output", tmp_path / name, "--config", config, "--device", "cpu",
                    "--dump-first-step", out)
    return load_file(out), proc.stderr


def edited_config(tmp_path, shipped, name, **changes):
    cfg = yaml.safe_load((ROOT / "configs" / shipped).read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        (cfg[section] if section else cfg)[field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_official_stage1_is_text_only(world, tmp_path):
    """No image features reach stage 1: the prompt is the vicuna_v1 text of the stored prompt, nothing more."""
    from llava.conversation import conv_templates
    step, log = dump_first_step(world, tmp_path, ROOT / "configs" / "official" / "stage1.yaml", "official")
    assert "image features per example 0-0" in log
    ids, scored = step["input_ids"], step["scored"]
    assert not (ids == IMAGE_ID).any()
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "Illustrate the details of the picture.")
    conv.append_message(conv.roles[1], None)
    prompt_tokens = len(tiny_models.tokenizer()(conv.get_prompt()).input_ids)
    for row in range(ids.shape[0]):
        assert int(scored[row].nonzero()[0]) == prompt_tokens
    step, log = dump_first_step(world, tmp_path, ROOT / "configs" / "paper" / "stage1.yaml", "paper")
    assert (step["input_ids"] == IMAGE_ID).sum(dim=1).min() > 2000  # anyres features of 640x480 / 480x640


def test_disable_dropout_is_lora_dropout_zero(world, tmp_path):
    official = ROOT / "configs" / "official" / "stage1.yaml"
    step, _ = dump_first_step(world, tmp_path, official, "disabled")
    zero, _ = dump_first_step(world, tmp_path, edited_config(tmp_path, "official/stage1.yaml", "zero",
                                                             disable_dropout=False, lora__dropout=0.0), "zero")
    dropped, _ = dump_first_step(world, tmp_path, edited_config(tmp_path, "official/stage1.yaml", "dropped",
                                                                disable_dropout=False), "dropped")
    grads = [k for k in step if k.startswith("grad.") and "lora_B" in k]
    assert grads
    assert all(np.array_equal(step[k].numpy(), zero[k].numpy()) for k in grads)
    assert any(not np.allclose(step[k].numpy(), dropped[k].numpy()) for k in grads)


def test_frozen_projector_is_not_in_the_adapter(world, tmp_path):
    """A run with train_projector false leaves the projector as loaded: the adapter holds LoRA weights only (the
    paper profile's trained projector is covered by test_dpo.py)."""
    out = tmp_path / "official"
    run_stic("train-dpo", "--model", world / "model", "--data", pairs_file(world, tmp_path), "--image-dir",
             world / "images", "--output", out, "--config", ROOT / "configs" / "official" / "stage1.yaml",
             "--device", "cpu")
    keys = list(load_file(out / "adapter_model.safetensors"))
    assert keys and all("lora_" in k for k in keys)
    assert json.loads((out / "adapter_config.json").read_text()).get("modules_to_save") is None


def test_official_stage2_pads_to_one_flat_tile(world, tmp_path):
    """pad_flat: one 336-px tile whatever the COCO size, 576 features without image_newline."""
    proc = run_stic("train-sft", "--model", world / "model", "--data", world / "instructions.json", "--image-dir",
                    world / "images", "--output", tmp_path / "sft", "--config",
                    ROOT / "configs" / "official" / "stage2.yaml", "--device", "cpu")
    features = proc.stderr.split("image features per example ")[1].split(")")[0]
    assert features == "576-576"


@pytest.mark.parametrize("photo,size", [("chelsea.png", None), ("coffee.png", None), ("astronaut.png", None),
                                        ("noise", (640, 480)), ("noise", (480, 640)), ("noise", (13, 500))])
def test_resize20_is_torchvision_resize_on_pil(tmp_path, photo, size):
    import torchvision.transforms as T
    if photo == "noise":
        src = tmp_path / "noise.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(src)
    else:
        src = IMAGES / photo
    run_stic("corrupt", "--image", src, "--output", tmp_path / "out.png", "--kind", "resize20")
    expected = np.asarray(T.Resize(size=20)(Image.open(src).convert("RGB")))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), expected)


def prefs(world, out, *extra, seed=3):
    run_stic("prefs", "--model", world / "model", "--image-dir", world / "images", "--images",
             world / "stage1.json", "--output", out, "--device", "cpu", "--max-new-tokens", 8, "--seed", seed, *extra)
    return records(out)


def test_corruption_flag_only_generates_from_the_clean_image(world, tmp_path):
    """flag-only: the corrupted-image half is flagged, names no corruption, and its text is the clean image's (the
    images each request gets are checked in the Rust unit tests of src/stic/prefs.rs: the tiny random model's text
    hardly depends on its image)."""
    seed = next(s for s in range(16) if any(r["image_corruption"] for r in
                                            prefs(world, tmp_path / f"probe{s}.jsonl", "--temperature", 0, seed=s)))
    applied = records(tmp_path / f"probe{seed}.jsonl")
    flagged = prefs(world, tmp_path / "flagged.jsonl", "--temperature", 0, "--corruption", "flag-only", seed=seed)
    for f, a in zip(flagged, applied):
        assert f["image_corruption"] == a["image_corruption"] and f["rejected"][0] == a["rejected"][0]
        if not f["image_corruption"]:
            continue
        assert f["corruption"] is None and a["corruption"] in ("resize20", "color_jitter")
        clean = run_stic("generate", "--model", world / "model", "--image", world / "images" / f["image"],
                         "--prompt", f["rejected"][0]["content"], "--template", "mistral_instruct",
                         "--max-new-tokens", 8, "--device", "cpu", "--json")
        assert f["rejected"][1]["content"] == json.loads(clean.stdout)["text"].strip()


def test_top_k_1_samples_the_greedy_tokens(world, tmp_path):
    greedy = prefs(world, tmp_path / "greedy.jsonl", "--temperature", 0)
    top1 = prefs(world, tmp_path / "top1.jsonl", "--temperature", 0.9, "--top-k", 1)
    sampled = prefs(world, tmp_path / "sampled.jsonl", "--temperature", 0.9)
    assert [r["chosen"] for r in top1] == [r["chosen"] for r in greedy]
    assert [r["chosen"] for r in sampled] != [r["chosen"] for r in greedy]


# ------------------------------------------------------------------------------------------ the quirk sweep
LOSS_WEIGHTING = "stage2.config.loss_weighting+stage2.config.device_batch"
SWEEP = ["--sweep", "paper", "--benchmarks", "scienceqa",
         "--switches", f"generation.top_k,{LOSS_WEIGHTING},eval.scienceqa_questions"]


def short_official(tmp_path, edit=lambda config: None, name="official_short.yaml"):
    """The official profile with short generations (the tiny model's random weights rarely stop on their own),
    changed further by `edit`."""
    config = yaml.safe_load((ROOT / "configs" / "official" / "reproduce.yaml").read_text())
    config["generation"]["max_new_tokens"] = 24
    config["eval"].update(max_new_tokens=8, description_max_new_tokens=24, max_new_tokens_by_benchmark={})
    edit(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def sweep_plan(stdout):
    """{run: {step: state}} from the plan of a sweep."""
    runs, run = {}, None
    for line in stdout.splitlines():
        if line[:4].strip().rstrip(".").isdigit() and line[3:5] == ". ":
            run = runs.setdefault(line[5:].split(":")[0].split(" (")[0], {})
        elif line.startswith("       ") and line.endswith("]"):
            step, state = line.strip()[:-1].split(" [")
            run[step] = state
    return runs


def test_quirk_sweep_shares_steps_and_resumes_after_a_kill(world, tmp_path):
    """`--sweep paper` on the official profile, three switches: a generation switch redoes everything after the
    stage-1 generation but shares the base model's evaluation, a stage-2 training switch shares all stage 1 and
    the base evaluation, an evaluation switch shares all training. Killed in the second run and run again, it
    skips what is done and shares the rest."""
    env = original_env(world, tmp_path)
    sweep_args = ["--config", short_official(tmp_path), *SWEEP]
    plan = reproduce(*sweep_args, "--plan", env=env)
    assert plan.returncode == 0, plan.stderr
    assert "not swept: model.checkpoint" in plan.stdout
    runs = sweep_plan(plan.stdout)
    assert list(runs) == ["base", LOSS_WEIGHTING, "eval.scienceqa_questions", "generation.top_k"]
    assert set(runs["base"].values()) == {"to run"}
    to_run = {name: [step for step, state in steps.items() if state == "to run"] for name, steps in runs.items()}
    assert to_run[LOSS_WEIGHTING] == ["train-sft", "eval-stic-scienceqa", "report"]
    assert to_run["eval.scienceqa_questions"] == ["eval-original-scienceqa", "eval-stic-scienceqa", "report"]
    assert to_run["generation.top_k"] == ["prefs", "train-dpo", "describe", "infuse", "train-sft",
                                          "eval-stic-scienceqa", "report"]
    assert runs["generation.top_k"]["eval-original-scienceqa"] == "shared with base"
    assert "22 of 36 steps to run" in plan.stdout

    sweep = tmp_path / "run" / "sweep"
    args = [str(STIC), "reproduce", *map(str, sweep_args)]
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = sweep / "stage2-config-loss_weighting-stage2-config-device_batch" / ".steps" / "infuse.json"
    deadline = time.time() + TIMEOUT
    while not marker.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_log = first.stderr.read()
    assert marker.exists() and first.returncode == -signal.SIGKILL, killed_log
    folders = [tmp_path / "run"] + [p for p in sweep.iterdir() if p.is_dir() and p.name != "configs"]
    done_before = {str(f): {m.stem for m in (f / ".steps").glob("*.json")} for f in folders}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["runs"] == 4
    assert summary["steps_run"] + summary["steps_shared"] + summary["steps_skipped"] == 36
    ran_again = 0
    for run in summary["sweep"]:
        done = done_before.get(run["output"], set())
        ran = {s["name"] for s in run["steps"] if s["ran"]}
        assert {s["name"] for s in run["steps"] if not s["ran"]} - set(run["shared"]) == done, run
        assert not ran & done, run
        ran_again += len(ran - {"report"})
    # every step but the reports ran once over the two invocations: 18 of the 22 to run
    shared_first = killed_log.count(" shared with run ")
    assert ran_again + sum(map(len, done_before.values())) - shared_first == 18, (killed_log, summary)
    assert summary["steps_skipped"] >= 14, summary  # the base run's eight steps, the six the second shared
    by_run = {r["run"]: r for r in summary["sweep"]}
    assert by_run["generation.top_k"]["shared"] == ["stage2-subset", "eval-original-scienceqa"]
    assert len(by_run["eval.scienceqa_questions"]["shared"]) == 6
    assert "[1/9] prefs: done before, skipped" in proc.stderr
    assert (sweep / "generation-top_k" / "eval" / "original" / "scienceqa").is_symlink()
    # each run has its switch: the generation run samples with top_k 0, the evaluation run asks the image questions
    command = json.loads((sweep / "generation-top_k" / ".steps" / "prefs.json").read_text())["command"]
    assert command[command.index("--top-k") + 1] == "0", command
    questions = lambda run: json.loads((run / "eval" / "original" / "scienceqa" / "summary.json").read_text())["total"]  # noqa
    assert (questions(tmp_path / "run"), questions(sweep / "eval-scienceqa_questions")) == (2, 1)

    table = (tmp_path / "report" / "reproduce_sweep.md").read_text()
    assert "| generation.top_k | 50 | 0 |" in table and "| eval.scienceqa_questions | all | image |" in table, table
    report = json.loads((tmp_path / "report" / "reproduce_sweep.json").read_text())
    assert [s["switch"] for s in report["switches"]] == list(runs)[1:]
    cell = report["switches"][0]["benchmarks"]["scienceqa"]["stic"]
    assert cell["delta"] == pytest.approx(cell["score"] - report["base"]["scienceqa"])
    assert Image.open(tmp_path / "report" / "reproduce_sweep.png").size == (1400, 640)


def test_quirk_sweep_refuses_an_unknown_switch_or_profile(world, tmp_path):
    env = env_for(world, tmp_path)
    assert_clean_failure(reproduce("--profile", "official", "--sweep", "paper", "--switches", "generation.top_p",
                                   "--plan", env=env), "no switch 'generation.top_p'", "generation.top_k")
    assert_clean_failure(reproduce("--profile", "official", "--sweep", "nonesuch", "--plan", env=env),
                         "unknown profile 'nonesuch'")


def test_stage1_as_sft_runs_to_the_end(world, tmp_path):
    """stage1.method: sft (the paper's Table 3): the pairs converted as the official convert_pref_to_sft.py does,
    stage 1 trained by train-sft on them, the rest of the pipeline from that adapter."""
    path = short_official(tmp_path, lambda config: config["stage1"].update(method="sft"), "stage1_sft.yaml")
    env = original_env(world, tmp_path)
    plan = reproduce("--config", path, "--plan", "--benchmarks", "scienceqa", env=env)
    assert plan.returncode == 0, plan.stderr
    steps = [line.split(". ", 1)[1].split(" [")[0] for line in plan.stdout.splitlines() if " [to run]" in line]
    assert steps[:3] == ["prefs", "prefs-to-sft", "train-stage1-sft"] and "train-dpo" not in steps, steps
    proc = reproduce("--config", path, "--benchmarks", "scienceqa", env=env)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    pairs = records(run / "stage1" / "prefs.jsonl")
    assert json.loads((run / "stage1" / "sft.json").read_text()) == official_pref_to_sft(pairs)
    command = json.loads((run / ".steps" / "train-stage1-sft.json").read_text())["command"]
    assert command[0] == "train-sft" and command[command.index("--config") + 1] == "configs/official/stage1.yaml"
    assert (run / "stage1" / "adapter" / "adapter_model.safetensors").is_file()
    assert isinstance(json.loads((tmp_path / "report" / "reproduce.json").read_text())
                      ["benchmarks"]["scienceqa"]["measured"]["stic"], float)



def test_image_distribution_step_draws_fig_7_into_the_report(world, tmp_path):
    """eval.image_distribution: after the evaluations, `stic image-distribution` on the stage-1 images and each
    benchmark's data; the report embeds its plot and gives its counts. The run evaluates MMBench alone (speed)."""
    def edit(config):
        config["eval"].update(image_distribution=True, image_distribution_perplexity=1,  # two images in all
                              max_new_tokens=2, description_max_new_tokens=4)
        config["generation"]["max_new_tokens"] = 4

    path = short_official(tmp_path, edit, "image_distribution.yaml")
    env = original_env(world, tmp_path)
    plan = reproduce("--config", path, "--plan", "--benchmarks", "scienceqa,mmbench", env=env)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    steps = [line.split(". ", 1)[1].split(" [")[0] for line in lines if " [to run]" in line]
    assert steps[-2:] == ["image-distribution", "report"], steps
    command = lines[next(k for k, line in enumerate(lines) if ". image-distribution [to run]" in line) + 1].split()
    assert [command[k + 1] for k, arg in enumerate(command) if arg == "--benchmark-set"] == [
        f"scienceqa={world / 'eval' / 'scienceqa'}", f"mmbench={world / 'eval' / 'mmbench'}"]
    assert command[command.index("--set") + 1] == f"stage1={world / 'stage1.json'}"

    proc = reproduce("--config", path, "--benchmarks", "mmbench", env=env)
    assert proc.returncode == 0, proc.stderr
    figure = tmp_path / "run" / "analysis" / "image_distribution"
    summary = json.loads((figure / "summary.json").read_text())
    assert [(s["name"], s["images"]) for s in summary["sets"]] == [("stage1", 1), ("mmbench", 1)]
    assert Image.open(figure / "image_distribution.png").format == "PNG"
    markdown = (tmp_path / "report" / "reproduce.md").read_text()
    assert "## Fig. 7: image distribution" in markdown
    assert "](<../run/analysis/image_distribution/image_distribution.png>)" in markdown, markdown
    assert "stage1 1 of 1 images, mmbench 1 of 1 images; perplexity 1.0" in markdown, markdown
    report = json.loads((tmp_path / "report" / "reproduce.json").read_text())["image_distribution"]
    assert report["sets"] == summary["sets"] and report["kl_divergence"] == pytest.approx(summary["kl_divergence"])
