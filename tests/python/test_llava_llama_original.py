"""stic on original LLaVA checkpoints with a Llama (Vicuna) decoder, `LlavaLlamaForCausalLM` (model_type
llava_llama), against LLaVA's own code (llava-torch 1.2.2.post1) on tiny models built and saved by it:
- LLaVA-v1.5-like: pad mode, the flat merge, PyTorch pickle shards, and no tower tensors in the checkpoint: the CLIP
  tower (geometry, weights, preprocessing) comes from its own folder, named by mm_vision_tower, as LLaVA's
  `CLIPVisionTower` loads it;
- LLaVA-v1.6-Vicuna-like: anyres with spatial_unpad, the tower inside, mm_vision_tower a hub id found in the local
  Hugging Face cache.
Token ids, pixel values, feature counts, logits and greedy tokens (batched and alone); `stic merge` of the v1.5
layout to llava-hf's LLaVA-1.5 run by transformers; and bad input."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny_models
from conftest import IMAGES, run_stic
from test_dpo import write_pairs
from test_llava_original import (COMMON, IMAGE_TOKEN_INDEX, as_png, assert_clean_failure, assert_greedy_follows_llava,
                                 assert_matches_llava, corpus, generate, llava_peft_adapter, reference_logits,
                                 stic_score, tokenize)

PROMPT = "A chat between a curious human and an artificial intelligence assistant. USER: <image>\nDescribe the " \
         "image in detail. ASSISTANT:"
PHOTO = "extreme_ironing.jpg"  # a COCO photo (640x480)


@pytest.fixture(scope="module")
def v15(tmp_path_factory):
    """LLaVA-v1.5-7b's layout: mm_vision_tower the tower's folder, pickle shards without the tower."""
    root = tmp_path_factory.mktemp("llava_v15")
    model, tokenizer, processor = tiny_models.build_llava_llama_original(
        root / "model", tower_inside=False, tower_name=None, image_aspect_ratio="pad", mm_patch_merge_type="flat",
        save_kwargs={"safe_serialization": False, "max_shard_size": "6MB"})
    return SimpleNamespace(model=model, tokenizer=tokenizer, processor=processor, folder=root / "model", root=root,
                           tower=root / "model-clip-tower")


@pytest.fixture(scope="module")
def v16(tmp_path_factory):
    """LLaVA-v1.6-Vicuna-7b's layout: anyres + spatial_unpad, the tower trained and saved inside."""
    root = tmp_path_factory.mktemp("llava_v16_vicuna")
    model, tokenizer, processor = tiny_models.build_llava_llama_original(
        root / "model", seed=1, image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad")
    return SimpleNamespace(model=model, tokenizer=tokenizer, processor=processor, folder=root / "model", root=root,
                           tower=root / "model-clip-tower")


def hub_cache(tmp_path, tower):
    """A Hugging Face cache holding `tower` as openai/clip-vit-large-patch14-336 (the layout huggingface-cli
    download writes)."""
    repo = tmp_path / "hub" / ("models--" + tiny_models.LLAVA_TOWER_NAME.replace("/", "--"))
    shutil.copytree(tower, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return tmp_path / "hub"


def test_v15_is_saved_as_liuhaotian_ships_it(v15):
    config = json.loads((v15.folder / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert "sliding_window" not in config and "unfreeze_mm_vision_tower" not in config
    shards = sorted(p.name for p in v15.folder.glob("pytorch_model-*.bin"))
    assert len(shards) > 1 and (v15.folder / "pytorch_model.bin.index.json").is_file()
    keys = json.loads((v15.folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert not any("vision_tower" in k for k in keys) and "model.mm_projector.0.weight" in keys


@pytest.mark.parametrize("photo", [PHOTO, "chelsea.png"])
def test_v15_logits_match_llava_with_the_tower_from_its_folder(v15, tmp_path, photo):
    path = as_png(photo, tmp_path) if photo.endswith(".jpg") else IMAGES / photo
    ids, pixels, logits = reference_logits(v15, path, PROMPT)
    got = stic_score(v15.folder, path, tmp_path, text=PROMPT)
    assert assert_matches_llava(got, ids, pixels, logits) == 576


def test_v15_from_the_jpeg_file_is_close_to_llava(v15, tmp_path):
    ids, pixels, logits = reference_logits(v15, IMAGES / PHOTO, PROMPT)
    got = stic_score(v15.folder, IMAGES / PHOTO, tmp_path, text=PROMPT)
    assert_matches_llava(got, ids, pixels, logits, pixel_tol=6 / 255 / 0.26, logit_tol=5e-2)


@pytest.mark.parametrize("fixture", ["v15", "v16"])
def test_greedy_tokens_batched_and_alone_follow_llava(fixture, request, tmp_path):
    llava = request.getfixturevalue(fixture)
    if fixture == "v16":
        request.getfixturevalue("monkeypatch").setenv("HF_HUB_CACHE", str(hub_cache(tmp_path, llava.tower)))
    rows = [(as_png(PHOTO, tmp_path), PROMPT),
            (IMAGES / "chelsea.png", "USER: <image>\nWhat is in the picture? ASSISTANT:"),
            (IMAGES / "logo.png", "USER: <image>\nColours? ASSISTANT:")]
    assert_greedy_follows_llava(llava, rows, steps=10, alone=1)


def test_v16_vicuna_matches_llava_with_and_without_the_tower_in_the_cache(v16, tmp_path, monkeypatch):
    """The tower inside the checkpoint wins over the folder's weights, as LLaVA's load_state_dict makes it; the
    geometry is the cached folder's, or read off the tensors when the hub id is not cached."""
    path = as_png(PHOTO, tmp_path)
    ids, pixels, logits = reference_logits(v16, path, PROMPT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert_matches_llava(stic_score(v16.folder, path, tmp_path, text=PROMPT), ids, pixels, logits)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path, v16.tower)))
    features = assert_matches_llava(stic_score(v16.folder, path, tmp_path, text=PROMPT), ids, pixels, logits)
    assert features > 576


def test_token_ids_are_llavas(v15):
    from llava.mm_utils import tokenizer_image_token
    texts = corpus() + [PROMPT]
    assert tokenize(v15.folder, texts) == [tokenizer_image_token(t, v15.tokenizer) for t in texts]


def copy_with_config(llava, tmp_path, **settings):
    folder = shutil.copytree(llava.folder, tmp_path / "model")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(settings)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_a_missing_tower_names_the_hub_id_and_the_download(v15, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    folder = copy_with_config(v15, tmp_path, mm_vision_tower=tiny_models.LLAVA_TOWER_NAME)
    assert_clean_failure(generate(folder, text=PROMPT), tiny_models.LLAVA_TOWER_NAME,
                         f"huggingface-cli download {tiny_models.LLAVA_TOWER_NAME}", "local folder", "mm_vision_tower")
    # the same id found in the cache runs
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path, v15.tower)))
    assert generate(folder, text=PROMPT).returncode == 0


def test_a_tower_folder_without_its_config_is_refused(v15, tmp_path):
    tower = shutil.copytree(v15.tower, tmp_path / "tower")
    (tower / "config.json").unlink()
    folder = copy_with_config(v15, tmp_path, mm_vision_tower=str(tower))
    assert_clean_failure(generate(folder, text=PROMPT), tower / "config.json", "mm_vision_tower")


@pytest.mark.parametrize("field,value", [("intermediate_size", 96), ("num_hidden_layers", 2)])
def test_a_tower_config_that_disagrees_with_the_tensors_is_refused(v15, v16, tmp_path, field, value):
    for llava, where in [(v15, "own"), (v16, "inside")]:
        tower = shutil.copytree(v15.tower, tmp_path / where / "tower")
        cfg = json.loads((tower / "config.json").read_text())
        cfg[field] = value
        (tower / "config.json").write_text(json.dumps(cfg))
        folder = copy_with_config(llava, tmp_path / where, mm_vision_tower=str(tower))
        assert_clean_failure(generate(folder, text=PROMPT), tower / "config.json", f"{field} is {value}")


def test_a_pickled_clip_model_folder_serves_as_the_tower(v15, tmp_path):
    """`CLIPModel` (text side too) saved as pytorch_model.bin: its vision_model.* tensors are the tower."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel
    vision = CLIPVisionModel.from_pretrained(v15.tower)
    clip = CLIPModel(CLIPConfig(vision_config=vision.config.to_dict(),
                                text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=99)))
    clip.vision_model.load_state_dict(vision.vision_model.state_dict())
    tower = tmp_path / "clip-model"
    clip.save_pretrained(tower, safe_serialization=False)
    shutil.copy(v15.tower / "preprocessor_config.json", tower)
    folder = copy_with_config(v15, tmp_path, mm_vision_tower=str(tower))
    ids, pixels, logits = reference_logits(v15, IMAGES / "chelsea.png", PROMPT)
    assert_matches_llava(stic_score(folder, IMAGES / "chelsea.png", tmp_path, text=PROMPT), ids, pixels, logits)


def test_model_type_llava_is_the_llama_decoder(v15, tmp_path):
    """The older name of LlavaLlamaForCausalLM's config type."""
    folder = copy_with_config(v15, tmp_path, model_type="llava")
    ids, pixels, logits = reference_logits(v15, IMAGES / "chelsea.png", PROMPT)
    assert_matches_llava(stic_score(folder, IMAGES / "chelsea.png", tmp_path, text=PROMPT), ids, pixels, logits)


def hf_ids(ids):
    """Original ids with llava-hf's `<image>`."""
    return torch.where(ids == IMAGE_TOKEN_INDEX, 32000, ids)


def assert_merged_logits_match(model, stic):
    """transformers' logits of the merged `model` on the ids and pixels of `stic score`, against its logits (the
    original's 32000 columns); returns transformers' logits."""
    with torch.no_grad():
        logits = model(input_ids=hf_ids(stic["input_ids"])[None],
                       pixel_values=stic["pixel_values"].reshape(1, 3, 336, 336)).logits[0]
    assert logits.shape[1] == 32064
    diff = (logits[:, :32000] - stic["logits"]).abs().max().item()
    assert diff <= 1e-4, f"max |logits diff| = {diff}"
    return logits


@pytest.fixture(scope="module")
def v15_merged(v15):
    """(PEFT's adapter on LLaVA's class, the model with it, the merged folder)."""
    adapter, merged = v15.root / "adapter", v15.root / "merged"
    with_lora = llava_peft_adapter(v15, adapter)
    run_stic("merge", "--model", v15.folder, "--adapter", adapter, "--output", merged)
    return adapter, with_lora, merged


def test_merge_of_v15_is_llava_hfs_llava_1_5(v15, v15_merged, tmp_path):
    """`stic merge` converts as transformers' convert_llava_weights_to_hf.py: `LlavaForConditionalGeneration` with
    the tower from its folder, vocabulary 32064 (`<image>` 32000, `<pad>` 32001), CLIPImageProcessor. transformers
    gives stic's logits of the original with the adapter (PEFT's, LoRA in the CLIP tower too) on LLaVA's pad-mode
    pixels; on a square image llava-hf's processor gives those pixels, and stic on the merged folder agrees."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    adapter, with_lora, merged = v15_merged
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration.from_pretrained(merged).eval()
    assert (model.config.text_config.vocab_size, model.config.image_token_index, model.config.pad_token_id) == \
        (32064, 32000, 32001)

    photo = as_png(PHOTO, tmp_path)  # not square: LLaVA pads it
    ids, pixels, ref = reference_logits(with_lora, photo, PROMPT)
    original = stic_score(v15.folder, photo, tmp_path, "--adapter", adapter, text=PROMPT)
    assert_matches_llava(original, ids, pixels, ref, logit_tol=1e-4)
    assert_merged_logits_match(model, original)

    square = IMAGES / "camera.png"
    original = stic_score(v15.folder, square, tmp_path, "--adapter", adapter, text=PROMPT)
    inputs = AutoProcessor.from_pretrained(merged)(images=Image.open(square), text=PROMPT, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == hf_ids(original["input_ids"]).tolist()
    assert torch.equal(inputs["pixel_values"].reshape(original["pixel_values"].shape), original["pixel_values"])
    logits = assert_merged_logits_match(model, dict(original, pixel_values=inputs["pixel_values"]))
    from_merged = stic_score(merged, square, tmp_path, text=PROMPT)
    assert from_merged["input_ids"].tolist() == inputs["input_ids"][0].tolist()
    assert (from_merged["logits"] - logits).abs().max().item() <= 1e-4

    embed = model.get_input_embeddings().weight
    assert torch.allclose(embed[32000:], embed[:32000].mean(0, keepdim=True).expand(64, -1), atol=1e-6)
    keys = load_file(merged / "model.safetensors").keys()
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys


def test_merged_v15_tokenizer_gives_the_slow_tokenizers_ids(v15, v15_merged):
    from llava.mm_utils import tokenizer_image_token
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(v15_merged[2])
    assert (tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<pad>")) == (32000, 32001)
    assert tokenizer.pad_token == "<pad>"
    for text in [t for t in corpus() + [PROMPT] if "<pad>" not in t]:  # llava-hf's added special token
        want = [32000 if i == IMAGE_TOKEN_INDEX else i for i in tokenizer_image_token(text, v15.tokenizer)]
        assert tokenizer(text).input_ids == want, text


def test_merge_refuses_anyres_with_the_flat_merge(v16, tmp_path):
    """LLaVA-NeXT in llava-hf always unpads and adds image_newline: no llava-hf model runs these features."""
    folder = copy_with_config(v16, tmp_path, mm_patch_merge_type="flat")
    proc = run_stic("merge", "--model", folder, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged",
                    check=False)
    assert_clean_failure(proc, folder / "config.json", "anyres with the flat merge", "no llava-hf equivalent")
    assert not (tmp_path / "merged").exists()


def test_merge_of_v15_with_a_stic_trained_adapter_and_projector(v15, tmp_path):
    from transformers import LlavaForConditionalGeneration
    trained, merged = tmp_path / "trained", tmp_path / "merged"
    run_stic("train-dpo", "--model", v15.folder, "--data", write_pairs(tmp_path / "pairs.jsonl", n=2), "--image-dir",
             IMAGES, "--output", trained, "--max-steps", "2", "--lr", "1e-2", "--projector-lr", "1e-3", "--lora-r",
             "4", "--lora-alpha", "8", "--grad-accum", "1", "--max-length", "4096", *COMMON)
    run_stic("merge", "--model", v15.folder, "--adapter", trained, "--output", merged)
    photo = as_png(PHOTO, tmp_path)
    plain = stic_score(v15.folder, photo, tmp_path, text=PROMPT)["logits"]
    with_adapter = stic_score(v15.folder, photo, tmp_path, "--adapter", trained, text=PROMPT)
    assert (with_adapter["logits"] - plain).abs().max() > 1e-3, "the adapter changed nothing"
    assert_merged_logits_match(LlavaForConditionalGeneration.from_pretrained(merged).eval(), with_adapter)
