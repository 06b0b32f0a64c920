"""stic on original LLaVA-v1.6 checkpoints (`LlavaMistralForCausalLM`, vocabulary 32000, the slow tokenizer, no
processor files) against LLaVA's own code (llava-torch 1.2.2.post1) on a tiny model built and saved by it: token
ids (`tokenizer_image_token`), pixel values (`process_images`), feature counts, logits and greedy tokens, with
LLaVA's anyres reading, its `unpad_image`, pad mode, the flat merge and batches; LoRA adapters written by PEFT on
LLaVA's class (CLIP q/k/v included); `stic merge` to llava-hf run by transformers; and bad input."""
import json
import shutil
import subprocess
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import tiny_models
from conftest import DEVICE, IMAGES, STIC, run_stic, run_stic_json

IMAGE_TOKEN_INDEX = -200  # llava.constants
PROMPT = "[INST] <image>\nDescribe the image in detail. [/INST]"
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "logo.png",
          "extreme_ironing.jpg", "rocket.jpg", "waterview.jpg"]
COMMON = ["--device", DEVICE, "--dtype", "f32"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_original")
    model, tokenizer, processor = tiny_models.build_llava_original(root / "model")
    return SimpleNamespace(model=model, tokenizer=tokenizer, processor=processor, folder=root / "model", root=root)


@contextmanager
def llava_config(model, **settings):
    """LLaVA's code reads image_aspect_ratio and mm_patch_merge_type from the config at every call."""
    saved = {k: getattr(model.config, k) for k in settings}
    for k, v in settings.items():
        setattr(model.config, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(model.config, k, v)


def model_copy(llava, tmp_path, **settings):
    """The checkpoint folder with config.json changed as `settings` say."""
    folder = shutil.copytree(llava.folder, tmp_path / "model")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(settings)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def as_png(name, tmp_path):
    """A photo as Pillow decodes it, saved losslessly, so that both sides see the same pixels (JPEG decoding
    itself is compared elsewhere)."""
    path = tmp_path / (name.rsplit(".", 1)[0] + ".png")
    Image.open(IMAGES / name).save(path)
    return path


def reference_inputs(llava, paths, prompt=PROMPT):
    """What LLaVA's eval scripts feed the model: ids, pixel values, input embeddings."""
    from llava.mm_utils import process_images, tokenizer_image_token
    images = [Image.open(p).convert("RGB") for p in paths]
    pixels = process_images(images, llava.processor, llava.model.config)
    ids = tokenizer_image_token(prompt, llava.tokenizer, return_tensors="pt")[None]
    with torch.no_grad():
        *_, embeds, _ = llava.model.prepare_inputs_labels_for_multimodal(
            ids, None, None, None, None, pixels, [im.size for im in images])
    return ids[0], pixels, embeds


def reference_logits(llava, path, prompt=PROMPT):
    ids, pixels, embeds = reference_inputs(llava, [path], prompt)
    with torch.no_grad():
        logits = llava.model(inputs_embeds=embeds).logits[0]
    return ids, pixels, logits


def reference_greedy(llava, path, prompt, steps):
    """Greedy decoding by hand on LLaVA's embeddings (its `generate` predates transformers' cache_position)."""
    _, _, embeds = reference_inputs(llava, [path], prompt)
    tokens, past = [], None
    with torch.no_grad():
        for _ in range(steps):
            out = llava.model(inputs_embeds=embeds, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token == llava.tokenizer.eos_token_id:
                break
            embeds = llava.model.get_model().embed_tokens(torch.tensor([[token]]))
    return tokens


def expanded(ids, features):
    out = []
    for i in ids.tolist():
        out.extend([IMAGE_TOKEN_INDEX] * features if i == IMAGE_TOKEN_INDEX else [i])
    return out


def stic_score(folder, image, tmp_path, *extra, text=PROMPT):
    out = tmp_path / "logits.safetensors"
    run_stic("score", "--model", folder, "--image", image, "--text", text, "--logits-out", out, *COMMON, *extra)
    return load_file(out)


def assert_matches_llava(got, ids, pixels, logits, pixel_tol=0.0, logit_tol=1e-3):
    features = logits.shape[0] - (len(ids) - 1)
    assert got["input_ids"].tolist() == expanded(ids, features), "input ids differ"
    assert got["pixel_values"].numel() == pixels.numel()
    pixel_diff = (got["pixel_values"] - pixels.reshape(got["pixel_values"].shape)).abs().max().item()
    assert pixel_diff <= pixel_tol, f"max |pixel diff| = {pixel_diff}"
    diff = (got["logits"] - logits).abs().max().item()
    assert diff <= logit_tol, f"max |logits diff| = {diff}"
    return features


@pytest.mark.parametrize("photo", PHOTOS)
def test_logits_match_llava_on_photos(llava, tmp_path, photo):
    path = as_png(photo, tmp_path) if photo.endswith(".jpg") else IMAGES / photo
    ids, pixels, logits = reference_logits(llava, path)
    assert_matches_llava(stic_score(llava.folder, path, tmp_path), ids, pixels, logits)


# (width, height) -> LLaVA's feature count; where transformers differs it is given too. Both sides at most one
# tile: LLaVA's (width, height) reading of the pinpoints picks another grid on ties. The last three keep the grid
# and differ in unpad_image's rounding.
SIZES = {(320, 240): (1026, 1368), (240, 320): (1376, 1032), (336, 336): (1176, 1176), (100, 50): (876, 1752),
         (704, 396): (1850, 1948), (396, 704): (1872, 1968), (110, 352): (1296, 1392)}


@pytest.mark.parametrize("width,height", list(SIZES))
def test_small_images_and_unpad_rounding_follow_llava(llava, tmp_path, width, height):
    rng = np.random.default_rng(width * 7919 + height)
    path = tmp_path / f"{width}x{height}.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    ids, pixels, logits = reference_logits(llava, path)
    features = assert_matches_llava(stic_score(llava.folder, path, tmp_path), ids, pixels, logits)
    assert features == SIZES[(width, height)][0]


@pytest.mark.parametrize("aspect,merge,features", [("pad", "spatial_unpad", 576), ("pad", "flat", 576),
                                                   ("anyres", "flat", 3 * 576)])
def test_pad_mode_and_flat_merge_follow_llava(llava, tmp_path, aspect, merge, features):
    folder = model_copy(llava, tmp_path, image_aspect_ratio=aspect, mm_patch_merge_type=merge)
    with llava_config(llava.model, image_aspect_ratio=aspect, mm_patch_merge_type=merge):
        ids, pixels, logits = reference_logits(llava, IMAGES / "chelsea.png")
    got = stic_score(folder, IMAGES / "chelsea.png", tmp_path)
    assert assert_matches_llava(got, ids, pixels, logits) == features


def test_greedy_tokens_and_batches_follow_llava(llava, tmp_path):
    """A batch of three (left-padded in stic) against LLaVA one prompt at a time."""
    rows = [(IMAGES / "chelsea.png", "[INST] <image>\nWhat is in the picture? [/INST]"),
            (as_png("rocket.jpg", tmp_path), "[INST] <image>\nDescribe the image in detail, step by step. [/INST]"),
            (IMAGES / "logo.png", "[INST] <image>\nColours? [/INST]")]
    steps = 12
    ref = [reference_greedy(llava, path, prompt, steps) for path, prompt in rows]
    batch = [a for path, prompt in rows for a in ("--image", path, "--text", prompt)]
    got = run_stic_json("generate", "--model", llava.folder, *batch, "--max-new-tokens", steps, "--json", *COMMON)
    assert [g["tokens"] for g in got] == ref
    [single] = run_stic_json("generate", "--model", llava.folder, "--image", rows[0][0], "--text", rows[0][1],
                             "--max-new-tokens", steps, "--json", *COMMON)
    assert single["tokens"] == ref[0]


def test_jpeg_files_are_close_to_llava(llava, tmp_path):
    """From the JPEG file itself: the decoders differ by a few grey levels (see the JPEG row of the README)."""
    ids, pixels, logits = reference_logits(llava, IMAGES / "extreme_ironing.jpg")
    got = stic_score(llava.folder, IMAGES / "extreme_ironing.jpg", tmp_path)
    assert_matches_llava(got, ids, pixels, logits, pixel_tol=6 / 255 / 0.26, logit_tol=5e-2)


def tokenize(folder, texts, *extra):
    lines = "".join(json.dumps(t) + "\n" for t in texts)
    proc = subprocess.run([str(STIC), "tokenize", "--model", str(folder), *extra], input=lines, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_token_ids_are_llavas_slow_tokenizer_with_tokenizer_image_token(llava):
    import test_tokenizer
    from llava.mm_utils import tokenizer_image_token
    texts = test_tokenizer.CORPUS + [PROMPT, "<image>", "<image>\n<image> two", "a<image>b", "<s><image></s>",
                                     "USER: <image>\nWhat is this? ASSISTANT:", " <image> ", "\n<image>\n"]
    got = tokenize(llava.folder, texts)
    ref = [tokenizer_image_token(t, llava.tokenizer) for t in texts]
    assert got == ref


def test_the_unpad_and_tie_cases_count_as_transformers_with_transformers_processing(llava, tmp_path):
    """`--processing transformers` on the same checkpoint: the counts of transformers' LlavaNextProcessor."""
    for (width, height), (_, transformers_count) in SIZES.items():
        path = tmp_path / f"{width}x{height}.png"
        Image.new("RGB", (width, height), (90, 30, 200)).save(path)
        out = run_stic_json("score", "--model", llava.folder, "--image", path, "--text", "<image>", "--processing",
                            "transformers", *COMMON)[0]
        assert out["seq_len"] == 1 + transformers_count, (width, height)
