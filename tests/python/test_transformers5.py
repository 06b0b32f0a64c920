"""Checkpoints and adapters saved by transformers 5 and PEFT 0.21, which run in the second environment `.venv-tf5`
(tf5_reference.py; this process runs transformers 4.57.6 and PEFT 0.17.1, whose side test_parity.py and
test_dpo.py cover): stic reads what transformers 5 writes and gives its logits, and PEFT 0.21 loads stic's adapters."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import DEVICE, IMAGES, ROOT, run_stic
from test_dpo import write_pairs

TF5_PYTHON = ROOT / ".venv-tf5" / "bin" / "python"
pytestmark = pytest.mark.skipif(not TF5_PYTHON.exists(),
                                reason=".venv-tf5 (transformers 5, PEFT 0.21) is missing: `make setup` creates it")

PROMPT = "[INST] <image>\nDescribe the image in detail. [/INST]"
TESTED_IMAGES = ["chelsea.png", "logo.png"]
# not CLIP's: a processor setting that is read from processor_config.json only
IMAGE_MEAN, IMAGE_STD = [0.5, 0.45, 0.4], [0.22, 0.25, 0.28]


def run_tf5(jobs, folder):
    spec = folder / "jobs.json"
    spec.write_text(json.dumps(jobs, default=str))
    proc = subprocess.run([str(TF5_PYTHON), str(Path(__file__).parent / "tf5_reference.py"), str(spec)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def tf5(tmp_path_factory, hf_models):
    """A model (RoPE theta 1e6, sliding window 100) and a PEFT adapter saved by transformers 5 / PEFT 0.21, and the
    references transformers 5 computes on it and on a checkpoint saved by transformers 4.57."""
    root = tmp_path_factory.mktemp("tf5")
    model, adapter = root / "model", root / "peft_adapter"
    jobs = [{"build": "mqa_window", "seed": 5, "out": model, "adapter": adapter,
             "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}]
    refs = {}
    for image in TESTED_IMAGES:
        for with_adapter in (False, True):
            refs[image, with_adapter] = root / f"{image}-{with_adapter}.safetensors"
            jobs.append({"reference": model, "image": IMAGES / image, "text": PROMPT,
                         "adapter": adapter if with_adapter else None, "out": refs[image, with_adapter]})
    _, folder_tf4 = hf_models["gqa"]
    jobs.append({"reference": folder_tf4, "image": IMAGES / "chelsea.png", "text": PROMPT, "out": root / "tf4.safetensors"})
    run_tf5(jobs, root)
    return {"model": model, "adapter": adapter, "refs": {k: load_file(v) for k, v in refs.items()},
            "tf4_folder": folder_tf4, "tf4_ref": load_file(root / "tf4.safetensors"), "root": root}


def stic_logits(folder, image, out, adapter=None):
    extra = ["--adapter", adapter] if adapter else []
    run_stic("score", "--model", folder, "--image", image, "--text", PROMPT, "--logits-out", out,
             "--device", DEVICE, "--dtype", "f32", *extra)
    return load_file(out)


# stic and transformers 5 run the same libtorch kernels on the CPU (measured max diff 0.0); RoPE at the default
# theta 1e4 instead of the config's 1e6 moves these logits by 1.2e-3, so the tolerance must be well below that
LOGITS_TOL = 1e-5 if DEVICE == "cpu" else 1e-3


def assert_matches(got, ref, logits_tol=LOGITS_TOL):
    assert torch.equal(got["input_ids"], ref["input_ids"]), "input ids differ"
    assert got["pixel_values"].shape == ref["pixel_values"].shape
    assert (got["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert got["image_size"].tolist() == ref["image_size"].tolist()
    diff = (got["logits"] - ref["logits"]).abs().max().item()
    assert diff <= logits_tol, f"max |logits diff| = {diff}"


def test_the_files_are_as_transformers5_writes_them(tf5):
    """What the other tests feed stic: keys without `vision_model.`, `rope_parameters`, a nested image processor."""
    model = tf5["model"]
    with safe_open(model / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "vision_tower.embeddings.patch_embedding.weight" in keys
    assert not any(k.startswith("vision_tower.vision_model.") for k in keys)
    text = json.loads((model / "config.json").read_text())["text_config"]
    assert "rope_theta" not in text and text["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
    assert not (model / "preprocessor_config.json").exists()
    nested = json.loads((model / "processor_config.json").read_text())["image_processor"]
    assert nested["image_mean"] == IMAGE_MEAN and nested["image_std"] == IMAGE_STD
    adapter_keys = load_file(tf5["adapter"] / "adapter_model.safetensors").keys()
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in adapter_keys
    assert json.loads((tf5["adapter"] / "adapter_config.json").read_text())["peft_version"].startswith("0.21")


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "peft_0.21_adapter"])
@pytest.mark.parametrize("image", TESTED_IMAGES)
def test_logits_match_transformers5(tf5, tmp_path, image, with_adapter):
    got = stic_logits(tf5["model"], IMAGES / image, tmp_path / "logits.safetensors",
                      adapter=tf5["adapter"] if with_adapter else None)
    assert_matches(got, tf5["refs"][image, with_adapter])
    if with_adapter:
        base = tf5["refs"][image, False]["logits"]
        assert (got["logits"] - base).abs().max().item() > 1e-3, "the adapter changed nothing"


def test_transformers4_checkpoint_gives_transformers5_logits(tf5, tmp_path):
    got = stic_logits(tf5["tf4_folder"], IMAGES / "chelsea.png", tmp_path / "logits.safetensors")
    assert_matches(got, tf5["tf4_ref"])


def test_stic_adapter_and_merge_load_in_transformers5(tf5, tmp_path):
    """PEFT 0.21 loads a stic adapter (with a trained projector) on the transformers 5 model, and transformers 5 loads
    `stic merge`'s checkpoint: both give stic's logits."""
    model = tf5["model"]
    adapter = tmp_path / "stic_adapter"
    run_stic("train-dpo", "--model", model, "--data", write_pairs(tmp_path / "pairs.jsonl", n=2), "--image-dir", IMAGES,
             "--output", adapter, "--max-steps", "2", "--lr", "1e-2", "--projector-lr", "1e-3", "--lora-r", "4",
             "--lora-alpha", "8", "--grad-accum", "1", "--max-length", "4096", "--dtype", "f32", "--device", DEVICE)
    got = stic_logits(model, IMAGES / "chelsea.png", tmp_path / "stic.safetensors", adapter=adapter)
    assert (got["logits"] - tf5["refs"]["chelsea.png", False]["logits"]).abs().max().item() > 1e-3
    merged = tmp_path / "merged"
    run_stic("merge", "--model", model, "--adapter", adapter, "--output", merged)
    ids = tmp_path / "stic.safetensors"  # the reference runs on stic's input_ids
    run_tf5([{"reference": model, "image": IMAGES / "chelsea.png", "text": PROMPT, "adapter": adapter,
              "input_ids": ids, "out": tmp_path / "peft.safetensors"},
             {"reference": merged, "image": IMAGES / "chelsea.png", "text": PROMPT, "input_ids": ids,
              "out": tmp_path / "merged.safetensors"}], tmp_path)
    assert_matches(got, load_file(tmp_path / "peft.safetensors"))
    # merging rounds W + scaling·B·A once in f32, where the adapter adds the product at run time
    assert_matches(got, load_file(tmp_path / "merged.safetensors"), logits_tol=1e-4)
