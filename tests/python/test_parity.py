"""stic against transformers' LlavaNextForConditionalGeneration on small random models: same pixels, ids, logits,
greedy tokens and image feature counts, in every weight layout."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny_models
from conftest import DEVICE, IMAGES, run_stic, run_stic_json

PROMPT = "[INST] <image>\nDescribe the image in detail. [/INST]"
PNG_IMAGES = ["astronaut.png", "camera.png", "logo.png", "chelsea.png", "coffee.png"]
JPEG_IMAGES = sorted(p.name for p in IMAGES.glob("*.jpg"))
PROCESSOR = tiny_models.processor()


def hf_inputs(image, text=PROMPT):
    inputs = PROCESSOR(images=Image.open(image), text=text, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    return inputs


def reference(model, image, text=PROMPT):
    inputs = hf_inputs(image, text)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    return inputs, logits


def stic_logits(folder, image, tmp_path, text=PROMPT, *extra):
    out = tmp_path / "logits.safetensors"
    run_stic("score", "--model", folder, "--image", image, "--text", text, "--logits-out", out,
             "--device", DEVICE, "--dtype", "f32", *extra)
    return load_file(out)


def assert_matches(got, inputs, ref_logits, pixel_tol=1e-5):
    assert torch.equal(got["input_ids"], inputs["input_ids"][0]), "input ids differ"
    ref_pixels = inputs["pixel_values"][0]
    assert got["pixel_values"].shape == ref_pixels.shape
    assert (got["pixel_values"] - ref_pixels).abs().max().item() <= pixel_tol
    assert got["image_size"].tolist() == inputs["image_sizes"][0].tolist()
    diff = (got["logits"] - ref_logits).abs().max().item()
    assert diff <= 1e-3, f"max |logits diff| = {diff}"


@pytest.mark.parametrize("variant", list(tiny_models.VARIANTS))
@pytest.mark.parametrize("image", PNG_IMAGES)
def test_logits_match_transformers(hf_models, tmp_path, variant, image):
    model, folder = hf_models[variant]
    inputs, ref = reference(model, IMAGES / image)
    assert_matches(stic_logits(folder, IMAGES / image, tmp_path), inputs, ref)


@pytest.mark.parametrize("layout", ["new_hf_sharded", "original_llava"])
@pytest.mark.parametrize("image", ["chelsea.png", "logo.png"])
def test_every_weight_layout_gives_the_same_logits(hf_models, tmp_path, layout, image):
    model, folder = hf_models["mha"]
    convert = tiny_models.to_new_hf_layout if layout == "new_hf_sharded" else tiny_models.to_original_layout
    converted = convert(folder, tmp_path / layout)
    inputs, ref = reference(model, IMAGES / image)
    # the reference is transformers: an original checkpoint follows LLaVA's code unless told otherwise
    assert_matches(stic_logits(converted, IMAGES / image, tmp_path, PROMPT, "--processing", "transformers"), inputs, ref)


@pytest.mark.parametrize("image", JPEG_IMAGES)
def test_jpeg_inputs_match_transformers_exactly(hf_models, tmp_path, image):
    """JPEGs decode as Pillow's libjpeg-turbo decodes them (tests/python/test_jpeg.py): same pixels, same logits."""
    model, folder = hf_models["gqa"]
    inputs, ref = reference(model, IMAGES / image)
    assert_matches(stic_logits(folder, IMAGES / image, tmp_path), inputs, ref, pixel_tol=0)


@pytest.mark.parametrize("variant", list(tiny_models.VARIANTS))
def test_greedy_tokens_match_transformers(hf_models, variant):
    model, folder = hf_models[variant]
    image = IMAGES / "coffee.png"
    inputs = hf_inputs(image)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=32, do_sample=False, pad_token_id=32001)
    ref_tokens = ref[0, inputs["input_ids"].shape[1]:].tolist()
    [got] = run_stic_json("generate", "--model", folder, "--image", image, "--text", PROMPT,
                          "--max-new-tokens", "32", "--json", "--device", DEVICE, "--dtype", "f32")
    assert got["tokens"] == ref_tokens
    assert got["prompt_tokens"] == inputs["input_ids"].shape[1]


SIZES = [(20, 20), (20, 500), (500, 20), (7, 1000), (1000, 7), (336, 336), (337, 335), (672, 336), (1000, 999),
         (333, 1000), (150, 700)]


@pytest.mark.parametrize("height,width", SIZES)
def test_feature_count_and_logits_for_odd_sizes(hf_models, tmp_path, height, width):
    model, folder = hf_models["gqa"]
    rng = np.random.default_rng(height * 7919 + width)
    path = tmp_path / f"{height}x{width}.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    inputs, ref = reference(model, path)
    assert_matches(stic_logits(folder, path, tmp_path), inputs, ref)


def test_batched_generation_equals_one_by_one(hf_models):
    """Seven rows: on the CPU a batch of 6-16 rows takes another GEMM path (W x^T) than a single row."""
    _, folder = hf_models["gqa"]
    images = [IMAGES / name for name in ("chelsea.png", "camera.png", "logo.png", "coffee.png", "astronaut.png",
                                         "rocket.jpg", "waterview.jpg")]
    prompts = ["What is in the picture?", "Describe the image in detail, step by step.", "Colours?",
               "Count the objects.", "Where is this?", "Is there any text?", "What is the mood?"]
    common = ["--model", folder, "--max-new-tokens", "24", "--json", "--device", DEVICE, "--dtype", "f32"]
    for sampling in ([], ["--temperature", "0.9", "--top-p", "0.9", "--seed", "7"]):
        batch_args = [a for img, p in zip(images, prompts) for a in ("--image", img, "--prompt", p)]
        batched = run_stic_json("generate", *common, *sampling, *batch_args)
        single = [run_stic_json("generate", *common, *sampling, "--image", img, "--prompt", p)[0]
                  for img, p in zip(images, prompts)]
        assert [b["tokens"] for b in batched] == [s["tokens"] for s in single]
        assert all(b["batch_size"] == len(images) for b in batched)
