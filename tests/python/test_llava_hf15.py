"""LLaVA-1.5 in llava-hf's layout (llava-hf/llava-1.5-7b-hf: `LlavaForConditionalGeneration`, `model_type` llava with
a Llama `text_config`, `CLIPImageProcessor`'s centre crop, 576 features per image, no `image_newline`) against
transformers 4.57 and 5 on small random models saved by each: same input ids (one `<image>` expanded to 576), same
pixels and logits on a COCO-sized JPEG, same greedy tokens alone and batched; adapters both ways with PEFT."""
import json
import shutil

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file

import llava15_models
import tiny_models
from conftest import DEVICE, IMAGES, run_stic, run_stic_json
from test_dpo import write_pairs
from test_errors import assert_clean_failure
from test_transformers5 import TF5_PYTHON

PROMPT = llava15_models.PROMPT
COCO_JPEG = IMAGES / "rocket.jpg"  # 640x427, as COCO's photos are: the crop cuts its sides


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    """(transformers 4.57 model, the folder it saved)."""
    model = llava15_models.build_model(seed=5)
    return model, llava15_models.save(model, tmp_path_factory.mktemp("llava15") / "model")


def hf_inputs(image, text=PROMPT):
    return llava15_models.processor()(images=Image.open(image), text=text, return_tensors="pt")


def stic_logits(folder, image, tmp_path, text=PROMPT, *extra):
    out = tmp_path / "logits.safetensors"
    run_stic("score", "--model", folder, "--image", image, "--text", text, "--logits-out", out,
             "--device", DEVICE, "--dtype", "f32", *extra)
    return load_file(out)


def assert_matches(got, input_ids, pixel_values, logits):
    assert torch.equal(got["input_ids"], input_ids), "input ids differ"
    assert (got["input_ids"] == 32000).sum() == 576
    assert got["pixel_values"].shape == (1, 3, 336, 336)
    assert torch.equal(got["pixel_values"][0], pixel_values), "pixels differ"
    diff = (got["logits"] - logits).abs().max().item()
    assert diff <= 1e-3, f"max |logits diff| = {diff}"


@pytest.mark.parametrize("layout", ["saved", "new_hf_sharded"])
def test_logits_match_transformers(llava15, tmp_path, layout):
    model, folder = llava15
    if layout == "new_hf_sharded":  # model.language_model.*, model.vision_tower.*, top-level lm_head
        folder = tiny_models.to_new_hf_layout(folder, tmp_path / layout)
    inputs = hf_inputs(COCO_JPEG)
    with torch.no_grad():
        ref = model(**inputs).logits[0]
    assert_matches(stic_logits(folder, COCO_JPEG, tmp_path), inputs["input_ids"][0], inputs["pixel_values"][0], ref)


def test_greedy_tokens_match_transformers_alone_and_batched(llava15):
    model, folder = llava15
    images = [COCO_JPEG, IMAGES / "waterview.jpg", IMAGES / "chelsea.png"]
    refs = []
    for image in images:
        inputs = hf_inputs(image)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=32001)
        refs.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    common = ["--model", folder, "--max-new-tokens", "16", "--json", "--device", DEVICE, "--dtype", "f32"]
    alone = [run_stic_json("generate", *common, "--image", image, "--text", PROMPT)[0]["tokens"] for image in images]
    batched = run_stic_json("generate", *common, *[a for image in images for a in ("--image", image, "--text", PROMPT)])
    assert alone == refs
    assert [row["tokens"] for row in batched] == refs


def test_stic_adapter_loads_in_peft_and_merges(llava15, tmp_path):
    model, folder = llava15
    out = tmp_path / "trained"
    run_stic("train-dpo", "--model", folder, "--data", write_pairs(tmp_path / "pairs.jsonl", n=2), "--image-dir",
             IMAGES, "--output", out, "--max-steps", "2", "--lr", "1e-2", "--projector-lr", "1e-3", "--lora-r", "4",
             "--lora-alpha", "8", "--grad-accum", "1", "--max-length", "4096", "--dtype", "f32", "--device", DEVICE)
    got = stic_logits(folder, COCO_JPEG, tmp_path, PROMPT, "--adapter", out)
    pixels = hf_inputs(COCO_JPEG)["pixel_values"]
    base = llava15_models.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        plain = base(input_ids=got["input_ids"][None], pixel_values=pixels).logits[0]
        peft = PeftModel.from_pretrained(base, out).eval()
        ref = peft(input_ids=got["input_ids"][None], pixel_values=pixels).logits[0]
    assert (got["logits"] - plain).abs().max() > 1e-3, "the adapter changed nothing"
    assert (got["logits"] - ref).abs().max().item() <= 1e-4

    merged = tmp_path / "merged"
    run_stic("merge", "--model", folder, "--adapter", out, "--output", merged)
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    merged_model = llava15_models.LlavaForConditionalGeneration.from_pretrained(merged).eval()
    with torch.no_grad():
        merged_logits = merged_model(input_ids=got["input_ids"][None], pixel_values=pixels).logits[0]
    assert (got["logits"] - merged_logits).abs().max().item() <= 1e-4


@pytest.mark.skipif(not TF5_PYTHON.exists(), reason=".venv-tf5 (transformers 5) is missing: `make setup` creates it")
def test_transformers5_checkpoint_and_peft_adapter(tmp_path):
    """A LLaVA-1.5 saved by transformers 5 (CLIP keys without `vision_model.`, the nested image processor) with a
    PEFT 0.21 adapter (`model.language_model.*` names), against the logits transformers 5 computes, with and
    without the adapter."""
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    refs = {with_adapter: tmp_path / f"ref-{with_adapter}.safetensors" for with_adapter in (False, True)}
    jobs = [{"build": 21, "out": model, "adapter": adapter}]
    jobs += [{"reference": model, "image": COCO_JPEG, "text": PROMPT, "adapter": adapter if a else None, "out": out}
             for a, out in refs.items()]
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs, default=str))
    proc = __import__("subprocess").run([str(TF5_PYTHON), str(llava15_models.__file__), str(spec)],
                                        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "image_processor" in json.loads((model / "processor_config.json").read_text())
    for with_adapter, ref in refs.items():
        want = load_file(ref)
        extra = ["--adapter", adapter] if with_adapter else []
        got = stic_logits(model, COCO_JPEG, tmp_path, PROMPT, *extra)
        assert_matches(got, want["input_ids"], want["pixel_values"], want["logits"])


def test_full_feature_strategy_is_refused(llava15, tmp_path):
    _, folder = llava15
    copy = shutil.copytree(folder, tmp_path / "model")
    config = json.loads((copy / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (copy / "config.json").write_text(json.dumps(config))
    proc = run_stic("score", "--model", copy, "--image", COCO_JPEG, "--prompt", "What is shown?", "--response",
                    "A rocket.", "--device", "cpu", check=False, timeout=120)
    assert_clean_failure(proc, "config.json", "vision_feature_select_strategy 'full'", "LLaVA-1.5")
