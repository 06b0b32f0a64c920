"""stic on original LLaVA checkpoints with a Llama (Vicuna) decoder, `LlavaLlamaForCausalLM` (model_type
llava_llama), against LLaVA's own code (llava-torch 1.2.2.post1) on tiny models built and saved by it:
- LLaVA-v1.5-like: pad mode, the flat merge, PyTorch pickle shards, and no tower tensors in the checkpoint: the CLIP
  tower (geometry, weights, preprocessing) comes from its own folder, named by mm_vision_tower, as LLaVA's
  `CLIPVisionTower` loads it;
- LLaVA-v1.6-Vicuna-like: anyres with spatial_unpad, the tower inside, mm_vision_tower a hub id found in the local
  Hugging Face cache.
Token ids, pixel values, feature counts, logits and greedy tokens (batched and alone); and bad input."""
import json
import shutil
from types import SimpleNamespace

import pytest

import tiny_models
from conftest import IMAGES, run_stic_json
from test_llava_original import (COMMON, as_png, assert_clean_failure, assert_matches_llava, corpus, generate,
                                 reference_greedy, reference_logits, stic_score, tokenize)

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
    steps = 10
    ref = [reference_greedy(llava, path, prompt, steps) for path, prompt in rows]
    batch = [a for path, prompt in rows for a in ("--image", path, "--text", prompt)]
    got = run_stic_json("generate", "--model", llava.folder, *batch, "--max-new-tokens", steps, "--json", *COMMON)
    assert [g["tokens"] for g in got] == ref
    [single] = run_stic_json("generate", "--model", llava.folder, "--image", rows[1][0], "--text", rows[1][1],
                             "--max-new-tokens", steps, "--json", *COMMON)
    assert single["tokens"] == ref[1]


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
