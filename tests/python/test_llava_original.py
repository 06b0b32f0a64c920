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
from conftest import DEVICE, IMAGES, ROOT, STIC, run_stic, run_stic_json

IMAGE_TOKEN_INDEX = -200  # llava.constants
PROMPT = "[INST] <image>\nDescribe the image in detail. [/INST]"
PHOTOS = ["camera.png", "chelsea.png", "logo.png", "extreme_ironing.jpg", "rocket.jpg", "waterview.jpg"]
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
    ref, got = assert_greedy_follows_llava(llava, rows, steps=12, alone=0)
    assert [g["text"] for g in got] == [llava.tokenizer.decode(r, skip_special_tokens=True) for r in ref]


def assert_greedy_follows_llava(llava, rows, steps, alone):
    """stic's greedy tokens for (image, prompt) `rows` in one batch, and for row `alone` by itself, against LLaVA
    one prompt at a time; returns (LLaVA's tokens, stic's batch outputs)."""
    ref = [reference_greedy(llava, path, prompt, steps) for path, prompt in rows]
    batch = [a for path, prompt in rows for a in ("--image", path, "--text", prompt)]
    got = run_stic_json("generate", "--model", llava.folder, *batch, "--max-new-tokens", steps, "--json", *COMMON)
    assert [g["tokens"] for g in got] == ref
    [single] = run_stic_json("generate", "--model", llava.folder, "--image", rows[alone][0], "--text",
                             rows[alone][1], "--max-new-tokens", steps, "--json", *COMMON)
    assert single["tokens"] == ref[alone]
    return ref, got


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


def corpus():
    import test_tokenizer
    return test_tokenizer.CORPUS + [PROMPT, "<image>", "<image>\n<image> two", "a<image>b", "<s><image></s>",
                                    "USER: <image>\nWhat is this? ASSISTANT:", " <image> ", "\n<image>\n"]


def test_token_ids_are_llavas_slow_tokenizer_with_tokenizer_image_token(llava):
    from llava.mm_utils import tokenizer_image_token
    texts = corpus()
    assert tokenize(llava.folder, texts) == [tokenizer_image_token(t, llava.tokenizer) for t in texts]


def test_the_non_legacy_slow_tokenizer_too(tmp_path):
    from llava.mm_utils import tokenizer_image_token
    from transformers import AutoTokenizer, LlamaTokenizer
    LlamaTokenizer(vocab_file=str(tiny_models.mistral_sentencepiece()), legacy=False).save_pretrained(tmp_path / "t")
    tok = AutoTokenizer.from_pretrained(tmp_path / "t", use_fast=False)
    assert not tok.legacy
    texts = corpus()
    assert tokenize(tmp_path / "t", texts, "--processing", "llava") == [tokenizer_image_token(t, tok) for t in texts]


def test_the_unpad_and_tie_cases_count_as_transformers_with_transformers_processing(llava, tmp_path):
    """`--processing transformers` on the same checkpoint: the counts of transformers' LlavaNextProcessor."""
    batch = []
    for width, height in SIZES:
        path = tmp_path / f"{width}x{height}.png"
        Image.new("RGB", (width, height), (90, 30, 200)).save(path)
        batch += ["--image", path, "--text", "<image>"]
    rows = run_stic_json("generate", "--model", llava.folder, *batch, "--processing", "transformers",
                         "--max-new-tokens", "1", "--json", *COMMON)
    assert [r["prompt_tokens"] for r in rows] == [1 + hf for _, hf in SIZES.values()]


def llava_peft_adapter(llava, out):
    """A PEFT adapter on LLaVA's class with LLaVA's own target modules: bare names, matched as suffixes, so CLIP's
    q/k/v projections get LoRA too (the layout of STIC's released adapters). B is random so that every pair
    changes the outputs, the vision tower's included."""
    import copy
    from peft import LoraConfig, get_peft_model
    targets = tiny_models.llava_find_all_linear_names(llava.model)
    assert sorted(targets) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft = get_peft_model(copy.deepcopy(llava.model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=targets, task_type="CAUSAL_LM"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    peft.save_pretrained(out)
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    return SimpleNamespace(model=peft.base_model.model.eval(), tokenizer=llava.tokenizer, processor=llava.processor)


@pytest.fixture(scope="module")
def adapter(llava):
    out = llava.root / "adapter"
    return out, llava_peft_adapter(llava, out)


def test_peft_adapter_on_llavas_class_loads_in_stic(llava, adapter, tmp_path):
    folder, with_lora = adapter
    ids, pixels, ref = reference_logits(with_lora, IMAGES / "chelsea.png")
    _, _, plain = reference_logits(llava, IMAGES / "chelsea.png")
    got = stic_score(llava.folder, IMAGES / "chelsea.png", tmp_path, "--adapter", folder)
    assert (ref - plain).abs().max() > 1e-2, "the adapter changed nothing"
    assert_matches_llava(got, ids, pixels, ref, logit_tol=1e-4)
    # without the vision tower's LoRA the logits are off: it is applied, not dropped
    tensors = load_file(folder / "adapter_model.safetensors")
    text_only = tmp_path / "text_only"
    shutil.copytree(folder, text_only)
    save_file({k: v for k, v in tensors.items() if "vision_tower" not in k}, text_only / "adapter_model.safetensors",
              metadata={"format": "pt"})
    off = stic_score(llava.folder, IMAGES / "chelsea.png", tmp_path, "--adapter", text_only)
    assert (off["logits"] - ref).abs().max() > 1e-3


def test_merge_from_the_original_layout_runs_in_transformers(llava, adapter, tmp_path):
    """`stic merge` writes a llava-hf checkpoint: transformers loads it with its processor and gives LLaVA's
    logits with the adapter (processing that agrees for this photo); the tokenizer is llava-hf's."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    folder, with_lora = adapter
    merged = tmp_path / "merged"
    run_stic("merge", "--model", llava.folder, "--adapter", folder, "--output", merged)
    model = LlavaNextForConditionalGeneration.from_pretrained(merged).eval()
    processor = LlavaNextProcessor.from_pretrained(merged)
    inputs = processor(images=Image.open(IMAGES / "chelsea.png"), text=PROMPT, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    ids, _, ref = reference_logits(with_lora, IMAGES / "chelsea.png")
    assert inputs["input_ids"][0].tolist() == [32000 if i == IMAGE_TOKEN_INDEX else i for i in expanded(ids, ref.shape[0] - len(ids) + 1)]
    assert logits.shape[1] == 32064 and model.config.image_token_index == 32000
    assert (logits[:, :32000] - ref).abs().max().item() <= 1e-4
    embed = model.get_input_embeddings().weight
    assert torch.allclose(embed[32000:], embed[:32000].mean(0, keepdim=True).expand(64, -1), atol=1e-6)
    shipped = json.loads((ROOT / "third_party" / "mistral-7b-tokenizer" / "tokenizer.json").read_text())
    assert json.loads((merged / "tokenizer.json").read_text()) == shipped


def commands(folder, tmp_path):
    """Every command that loads a model, at toy scale."""
    import eval_data
    pairs = tmp_path / "pairs.jsonl"
    record = {"image": "chelsea.png", "chosen": [{"role": "user", "content": "Describe."},
                                                  {"role": "assistant", "content": "A cat."}],
              "rejected": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "A dog."}]}
    pairs.write_text(json.dumps(record) + "\n")
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"id": "1", "image": "chelsea.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}]))
    bench = eval_data.scienceqa(tmp_path / "sqa")
    train = ["--image-dir", IMAGES, "--max-steps", "1", "--batch-size", "1", "--grad-accum", "1", "--lora-r", "2",
             "--max-length", "4096", *COMMON]
    gen = ["--max-new-tokens", "3", "--device", DEVICE]
    return {
        "generate": ["generate", "--model", folder, "--image", IMAGES / "chelsea.png", "--prompt", "Hi", *gen],
        "score": ["score", "--model", folder, "--image", IMAGES / "chelsea.png", "--prompt", "Hi", "--response", "Yo"],
        "train-dpo": ["train-dpo", "--model", folder, "--data", pairs, "--output", tmp_path / "dpo", *train],
        "train-sft": ["train-sft", "--model", folder, "--data", sft, "--output", tmp_path / "sft", *train],
        "prefs": ["prefs", "--model", folder, "--image-dir", IMAGES, "--limit", "1", "--output", tmp_path / "p.jsonl", *gen],
        "describe": ["describe", "--model", folder, "--data", sft, "--image-dir", IMAGES, "--output",
                     tmp_path / "d.jsonl", *gen],
        "eval": ["eval", "--model", folder, "--benchmark", "scienceqa", "--data", bench.path, "--limit", "1",
                 "--output", tmp_path / "eval", "--dar", "--max-new-tokens", "3", "--description-max-new-tokens", "3",
                 "--device", DEVICE],
    }


def test_every_command_runs_on_the_original_checkpoint(llava, tmp_path):
    for name, args in commands(llava.folder, tmp_path).items():
        proc = run_stic(*args, check=False)
        assert proc.returncode == 0 and "panicked" not in proc.stderr, f"{name}: {proc.stderr}"
    run_stic("describe", "--model", llava.folder, "--adapter", tmp_path / "dpo", "--data", tmp_path / "sft.json",
             "--image-dir", IMAGES, "--output", tmp_path / "d2.jsonl", "--max-new-tokens", "3", "--device", DEVICE)


def assert_clean_failure(proc, *needles):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "panicked" not in proc.stderr, proc.stderr
    for needle in needles:
        assert str(needle) in proc.stderr, f"{needle!r} not in: {proc.stderr}"


def generate(folder, *extra, text=PROMPT):
    return run_stic("generate", "--model", folder, "--image", IMAGES / "chelsea.png", "--text", text,
                    "--max-new-tokens", "2", "--device", "cpu", *extra, check=False)


@pytest.mark.parametrize("setting,value,needle", [
    ("mm_patch_merge_type", "spatial", "mm_patch_merge_type 'spatial'"),
    ("image_aspect_ratio", "square", "image_aspect_ratio 'square'"),
    ("mm_projector_type", "linear", "mm_projector_type 'linear'"),
    ("mm_use_im_start_end", True, "mm_use_im_start_end"),
    ("mm_vision_tower", "google/siglip-so400m-patch14-384", "not a CLIP tower"),
])
def test_a_config_stic_cannot_map_is_refused(llava, tmp_path, setting, value, needle):
    folder = model_copy(llava, tmp_path, **{setting: value})
    assert_clean_failure(generate(folder), "config.json", needle)


def test_unknown_tensors_are_refused(llava, tmp_path):
    folder = model_copy(llava, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert_clean_failure(generate(folder), "unknown tensor model.layers.0.self_attn.q_norm.weight", str(folder))


def test_a_tokenizer_with_ids_beyond_the_vocabulary_is_refused(llava, tmp_path):
    """llava-hf's tokenizer (32002 tokens) in a folder of vocabulary 32000: `<pad>` has no embedding."""
    folder = model_copy(llava, tmp_path)
    shutil.copy(ROOT / "third_party" / "mistral-7b-tokenizer" / "tokenizer.json", folder / "tokenizer.json")
    assert generate(folder, "--processing", "transformers").returncode == 0
    assert_clean_failure(generate(folder, "--processing", "transformers", text="[INST] <image>\n<pad> [/INST]"),
                         "tokenizer.json", "32001", "32000")


def test_llava_processing_without_tokenizer_model_is_refused(llava, tmp_path):
    folder = model_copy(llava, tmp_path)
    (folder / "tokenizer.model").unlink()
    assert_clean_failure(generate(folder), "tokenizer.model", "--processing transformers")


def test_score_refuses_a_response_longer_than_the_context(llava, tmp_path):
    folder = model_copy(llava, tmp_path, max_position_embeddings=1600)
    proc = run_stic("score", "--model", folder, "--image", IMAGES / "chelsea.png", "--prompt", "Hi",
                    "--response", "word " * 400, "--device", "cpu", check=False)
    assert_clean_failure(proc, "context")


def test_a_pickled_adapter_is_refused_with_the_conversion(llava, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)},
               out / "adapter_model.bin")
    assert_clean_failure(generate(llava.folder, "--adapter", out), "adapter_model.bin", "pickle", "save_file")
