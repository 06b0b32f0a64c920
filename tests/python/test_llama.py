"""LLaVA-NeXT on a Llama decoder (llava-hf/llava-v1.6-vicuna-7b-hf's layout: `LlavaNextForConditionalGeneration` with
`text_config.model_type` llama) against transformers 4.57 on small random models saved by it, with multi-head and
grouped-query attention: same input ids, pixels and logits on a COCO-sized JPEG, same greedy tokens alone and
batched; the same on a model saved by transformers 5; and a decoder type stic does not run refused with exit 2."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models
from conftest import DEVICE, IMAGES, run_stic, run_stic_json
from test_dpo import peft_adapter, write_pairs
from test_errors import assert_clean_failure
from test_parity import assert_matches, hf_inputs, reference, stic_logits
from test_transformers5 import IMAGE_MEAN, IMAGE_STD, TF5_PYTHON, run_tf5

# conv_vicuna_v1, as llava-hf's Vicuna model cards prompt it
PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions. USER: <image>\nDescribe the image in detail. "
          "ASSISTANT:")
COCO_JPEG = IMAGES / "rocket.jpg"  # 640x427, as COCO's photos are
VARIANTS = list(tiny_models.LLAMA_VARIANTS)


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
    """variant -> (transformers model, folder saved by transformers 4.57 in the llava-hf layout)."""
    root = tmp_path_factory.mktemp("llama")
    return {variant: (model, tiny_models.save_hf(model, root / variant))
            for seed, variant in enumerate(VARIANTS, start=11)
            for model in [tiny_models.build_model(variant, seed=seed)]}


def test_the_files_are_llava_next_llama(llama_models):
    """What the other tests feed stic: a LlamaConfig text section with an untied lm_head."""
    model, folder = llama_models["llama_mha"]
    text = json.loads((folder / "config.json").read_text())["text_config"]
    assert text["model_type"] == "llama" and text["num_key_value_heads"] == text["num_attention_heads"]
    assert "rope_theta" not in text or text["rope_theta"] == 10000.0
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("image", [COCO_JPEG.name, "chelsea.png"])
def test_logits_match_transformers(llama_models, tmp_path, variant, image):
    model, folder = llama_models[variant]
    inputs, ref = reference(model, IMAGES / image, PROMPT)
    pixel_tol = 0 if image.endswith(".jpg") else 1e-5
    assert_matches(stic_logits(folder, IMAGES / image, tmp_path, PROMPT), inputs, ref, pixel_tol=pixel_tol)


def test_text_config_without_model_type_reads_as_llama(llama_models, tmp_path):
    """transformers reads a text section without model_type (or num_key_value_heads) as LlamaConfig's defaults."""
    model, folder = llama_models["llama_mha"]
    copy = shutil.copytree(folder, tmp_path / "model")
    config = json.loads((copy / "config.json").read_text())
    for key in ("model_type", "num_key_value_heads", "rope_theta"):
        config["text_config"].pop(key, None)
    (copy / "config.json").write_text(json.dumps(config))
    inputs, ref = reference(model, COCO_JPEG, PROMPT)
    assert_matches(stic_logits(copy, COCO_JPEG, tmp_path, PROMPT), inputs, ref, pixel_tol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_transformers_alone_and_batched(llama_models, variant):
    model, folder = llama_models[variant]
    images = [COCO_JPEG, IMAGES / "waterview.jpg", IMAGES / "extreme_ironing.jpg"]
    refs = []
    for image in images:
        inputs = hf_inputs(image, PROMPT)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=32001)
        refs.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    common = ["--model", folder, "--max-new-tokens", "24", "--json", "--device", DEVICE, "--dtype", "f32"]
    alone = [run_stic_json("generate", *common, "--image", image, "--text", PROMPT)[0]["tokens"] for image in images]
    batched = run_stic_json("generate", *common, *[a for image in images for a in ("--image", image, "--text", PROMPT)])
    assert alone == refs
    assert [row["tokens"] for row in batched] == refs
    assert all(row["batch_size"] == len(images) for row in batched)


@pytest.mark.skipif(not TF5_PYTHON.exists(), reason=".venv-tf5 (transformers 5) is missing: `make setup` creates it")
def test_logits_match_transformers5_on_its_own_checkpoint(tmp_path):
    """A LLaVA-NeXT-Llama saved by transformers 5 (`rope_parameters`, keys without `vision_model.`, the nested image
    processor), against the logits transformers 5 computes on it."""
    model, ref = tmp_path / "model", tmp_path / "ref.safetensors"
    run_tf5([{"build": "llama_gqa", "seed": 21, "out": model, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD},
             {"reference": model, "image": COCO_JPEG, "text": PROMPT, "out": ref}], tmp_path)
    text = json.loads((model / "config.json").read_text())["text_config"]
    assert text["model_type"] == "llama" and "rope_parameters" in text
    got, want = stic_logits(model, COCO_JPEG, tmp_path, PROMPT), load_file(ref)
    assert torch.equal(got["input_ids"], want["input_ids"]), "input ids differ"
    assert (got["pixel_values"] - want["pixel_values"]).abs().max().item() <= 1e-5
    diff = (got["logits"] - want["logits"]).abs().max().item()
    assert diff <= 1e-3, f"max |logits diff| = {diff}"


def train_adapter(folder, tmp_path):
    """A stic DPO adapter with a trained projector (a large lr, so that it changes the logits)."""
    out = tmp_path / "stic_adapter"
    run_stic("train-dpo", "--model", folder, "--data", write_pairs(tmp_path / "pairs.jsonl", n=2), "--image-dir",
             IMAGES, "--output", out, "--max-steps", "2", "--lr", "1e-2", "--projector-lr", "1e-3", "--lora-r", "4",
             "--lora-alpha", "8", "--grad-accum", "1", "--max-length", "4096", "--dtype", "f32", "--device", DEVICE)
    return out


def test_peft_adapters_load_both_ways_on_transformers4(tmp_path):
    """PEFT 0.17's adapter (non-zero B, trained projector) on a LLaVA-NeXT-Llama gives PEFT's logits in stic, and a
    stic-trained adapter gives stic's logits in PEFT."""
    from peft import PeftModel
    model = tiny_models.build_model("llama_gqa", seed=31)
    folder = tiny_models.save_hf(model, tmp_path / "model")
    peft_dir, model = peft_adapter(model, tmp_path / "peft_adapter", seed=32)
    inputs, plain = reference(model, COCO_JPEG, PROMPT)
    for adapter in (peft_dir, train_adapter(folder, tmp_path)):
        peft = PeftModel.from_pretrained(model, adapter).eval()
        with torch.no_grad():
            ref = peft(**inputs).logits[0]
        model = peft.unload()
        got = stic_logits(folder, COCO_JPEG, tmp_path, PROMPT, "--adapter", adapter)
        assert (got["logits"] - plain).abs().max() > 1e-3, "the adapter changed nothing"
        assert_matches(got, inputs, ref, pixel_tol=0)


@pytest.mark.skipif(not TF5_PYTHON.exists(), reason=".venv-tf5 (transformers 5) is missing: `make setup` creates it")
def test_peft_adapters_load_both_ways_on_transformers5(tmp_path):
    """The same with PEFT 0.21 on a LLaVA-NeXT-Llama saved by transformers 5."""
    model, peft_dir = tmp_path / "model", tmp_path / "peft_adapter"
    run_tf5([{"build": "llama_gqa", "seed": 23, "out": model, "adapter": peft_dir, "image_mean": IMAGE_MEAN,
              "image_std": IMAGE_STD},
             {"reference": model, "image": COCO_JPEG, "text": PROMPT, "adapter": peft_dir,
              "out": tmp_path / "peft.safetensors"}], tmp_path)
    trained = train_adapter(model, tmp_path)
    stic_ids = tmp_path / "stic.safetensors"
    got = {adapter: stic_logits(model, COCO_JPEG, tmp_path, PROMPT, "--adapter", adapter)
           for adapter in (peft_dir, trained)}
    save_file({"input_ids": got[trained]["input_ids"]}, stic_ids)
    run_tf5([{"reference": model, "image": COCO_JPEG, "text": PROMPT, "adapter": trained, "input_ids": stic_ids,
              "out": tmp_path / "trained.safetensors"}], tmp_path)
    for adapter, ref in [(peft_dir, "peft.safetensors"), (trained, "trained.safetensors")]:
        want = load_file(tmp_path / ref)
        assert torch.equal(got[adapter]["input_ids"], want["input_ids"]), "input ids differ"
        diff = (got[adapter]["logits"] - want["logits"]).abs().max().item()
        assert diff <= 1e-3, f"max |logits diff| = {diff}"
    assert (got[trained]["logits"] - got[peft_dir]["logits"]).abs().max() > 1e-3


BAD_TEXT_SECTIONS = [
    ("qwen2_decoder", {"model_type": "qwen2"},
     ["config.json", "text_config.model_type is 'qwen2'", "Mistral and Llama", "mistral or llama"]),
    # transformers 4.57's Llama ignores it in a forward pass but its generation cache keeps only the window
    ("llama_with_window", {"sliding_window": 100},
     ["config.json", "text_config.sliding_window is 100", "a Llama decoder has none"]),
]


@pytest.mark.parametrize("edit,phrases", [c[1:] for c in BAD_TEXT_SECTIONS], ids=[c[0] for c in BAD_TEXT_SECTIONS])
def test_a_decoder_stic_does_not_run_is_refused(llama_models, tmp_path, edit, phrases):
    _, folder = llama_models["llama_gqa"]
    copy = shutil.copytree(folder, tmp_path / "model")
    config = json.loads((copy / "config.json").read_text())
    config["text_config"].update(edit)
    (copy / "config.json").write_text(json.dumps(config))
    proc = run_stic("score", "--model", copy, "--image", COCO_JPEG, "--prompt", "What is shown?", "--response",
                    "A rocket.", "--device", "cpu", check=False, timeout=120)
    assert_clean_failure(proc, *phrases)
