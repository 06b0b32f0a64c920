"""LLaVA-v1.6-34B's files on tiny models: the Yi tokenizer (64000 pieces, `<|startoftext|>` and `<|im_end|>` as BOS and
EOS, no BOS added, no dummy prefix), the `chatml_direct` template, grouped-query attention (56:8 in the real model, 4:2
here), RoPE theta 5e6, and `eos_token_id` 7:
- original (liuhaotian/llava-v1.6-34b): `LlavaLlamaForCausalLM` with anyres and spatial_unpad, built and run by LLaVA's
  own code, its slow tokenizer loaded as LLaVA's builder loads it;
- llava-hf (llava-hf/llava-v1.6-34b-hf): `LlavaNextForConditionalGeneration`, vocabulary 64064, `<image>` 64000,
  its fast tokenizer converted by transformers from the slow one, run by transformers' `generate`.
Token ids, pixels, logits, greedy tokens alone and batched, and where generation stops."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import tiny_models
from conftest import DEVICE, IMAGES, run_stic, run_stic_json
from test_llava_original import (COMMON, as_png, assert_clean_failure, assert_greedy_follows_llava, assert_matches_llava,
                                 corpus, reference_logits, stic_score, tokenize)
from test_parity import assert_matches, stic_logits

PHOTO = "extreme_ironing.jpg"  # a COCO photo (640x480)
# GQA and RoPE as Yi-34B has them, scaled down; LLaVA-v1.6-34B's config ids
YI_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=5e6,
               bos_token_id=1, eos_token_id=7, pad_token_id=0)


def chatml(question):
    """LLaVA's conv_chatml_direct prompt for one image question."""
    from llava.conversation import conv_templates
    conv = conv_templates["chatml_direct"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


PROMPT_QUESTIONS = ["Describe the image in detail.", "What is in the picture?", "Colours?"]


@pytest.fixture(scope="module")
def llava34(tmp_path_factory):
    """liuhaotian/llava-v1.6-34b's layout, in a folder whose name picks chatml_direct."""
    root = tmp_path_factory.mktemp("llava34")
    folder = root / "llava-v1.6-34b"
    tokenizer = tiny_models.yi_tokenizer(root / "yi-tokenizer")
    model, _, processor = tiny_models.build_llava_llama_original(
        folder, seed=3, image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", tokenizer=tokenizer,
        vocab_size=tiny_models.YI_VOCAB, text=YI_TEXT)
    from transformers import AutoTokenizer
    return SimpleNamespace(model=model, tokenizer=AutoTokenizer.from_pretrained(folder, use_fast=False),
                           processor=processor, folder=folder, root=root)


def test_prefs_runs_with_chatml_direct_picked_by_the_name(llava34, tmp_path):
    """The official rule reads the template off the model name; the pairs come out of the Yi-tokenized model."""
    out = tmp_path / "prefs.jsonl"
    run_stic("prefs", "--model", llava34.folder, "--image-dir", IMAGES, "--output", out, "--limit", "1",
             "--max-new-tokens", "3", *COMMON)
    assert json.loads(out.with_name(out.name + ".settings.json").read_text())["template"] == "chatml_direct"
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["chosen"] and record["rejected"]


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_token_ids_are_llavas_with_the_yi_tokenizer(tmp_path, dummy_prefix):
    """The slow tokenizer as LLaVA's builder loads it (`use_fast=False`) with `tokenizer_image_token`; no BOS."""
    from llava.mm_utils import tokenizer_image_token
    tokenizer = tiny_models.yi_tokenizer(tmp_path, add_dummy_prefix=dummy_prefix)
    texts = corpus() + [chatml(q) for q in PROMPT_QUESTIONS] + ["<|im_start|>user\n<|im_end|> <|im_start|> x"]
    expected = [tokenizer_image_token(t, tokenizer) for t in texts]
    assert all(ids[0] != tokenizer.bos_token_id for ids in expected if ids)
    assert tokenize(tmp_path, texts, "--processing", "llava") == expected


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_transformers_processing_converts_tokenizer_model_as_transformers_does(tmp_path, dummy_prefix):
    """Without tokenizer.json, `--processing transformers` tokenizes as transformers' fast tokenizer converted from
    tokenizer.model, which prepends the dummy prefix that Yi's model leaves out (so it differs from the slow one)."""
    from transformers import AutoTokenizer
    slow = tiny_models.yi_tokenizer(tmp_path, add_dummy_prefix=dummy_prefix)
    fast = AutoTokenizer.from_pretrained(tmp_path)
    assert type(fast).__name__ == "LlamaTokenizerFast"
    texts = [t for t in corpus() if "<image>" not in t] + [chatml(q).replace("<image>\n", "") for q in PROMPT_QUESTIONS]
    expected = [fast(t).input_ids for t in texts]
    assert tokenize(tmp_path, texts, "--processing", "transformers") == expected
    assert dummy_prefix or expected != [slow(t).input_ids for t in texts]


def test_logits_match_llava(llava34, tmp_path):
    path = as_png(PHOTO, tmp_path)
    prompt = chatml("Describe the image in detail.")
    ids, pixels, logits = reference_logits(llava34, path, prompt)
    assert logits.shape[-1] == tiny_models.YI_VOCAB
    assert assert_matches_llava(stic_score(llava34.folder, path, tmp_path, text=prompt), ids, pixels, logits) > 576


def test_greedy_tokens_batched_and_alone_follow_llava(llava34, tmp_path):
    rows = [(as_png(PHOTO, tmp_path), chatml(PROMPT_QUESTIONS[0])), (IMAGES / "chelsea.png", chatml(PROMPT_QUESTIONS[1])),
            (IMAGES / "logo.png", chatml(PROMPT_QUESTIONS[2]))]
    assert_greedy_follows_llava(llava34, rows, steps=10, alone=1)


@pytest.fixture(scope="module")
def llava_hf34(tmp_path_factory):
    """llava-hf/llava-v1.6-34b-hf's layout: (model, processor, folder)."""
    from transformers import (AddedToken, LlamaConfig, LlamaTokenizerFast, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor)
    root = tmp_path_factory.mktemp("llava_hf34")
    tiny_models.yi_tokenizer(root / "slow")
    tokenizer = LlamaTokenizerFast.from_pretrained(root / "slow", from_slow=True)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [64000, 64001]
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    text, vision = tiny_models.LLAMA_VARIANTS["llama_gqa"]
    config = LlavaNextConfig(
        text_config=LlamaConfig(vocab_size=64064, **{**text, **YI_TEXT}),
        vision_config=tiny_models.CLIPVisionConfig(image_size=336, patch_size=14, **vision),
        image_token_index=64000, image_grid_pinpoints=tiny_models.PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(5)
    model = LlavaNextForConditionalGeneration(config).eval()
    tiny_models.randomise_norms_and_biases(model)
    processor = LlavaNextProcessor(image_processor=tiny_models.processor().image_processor, tokenizer=tokenizer,
                                   patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    folder = root / "llava-v1.6-34b-hf"
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 7
    return model, processor, folder


def hf_inputs(processor, image, text):
    return processor(images=Image.open(image), text=text, return_tensors="pt")


def test_llava_hf_logits_match_transformers(llava_hf34, tmp_path):
    model, processor, folder = llava_hf34
    prompt = chatml("Describe the image in detail.")
    inputs = hf_inputs(processor, IMAGES / "rocket.jpg", prompt)
    with torch.no_grad():
        ref = model(**inputs).logits[0]
    assert_matches(stic_logits(folder, IMAGES / "rocket.jpg", tmp_path, prompt), inputs, ref, pixel_tol=0)


def hf_generate(model, processor, image, prompt, steps):
    inputs = hf_inputs(processor, image, prompt)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=64001)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_llava_hf_greedy_tokens_and_the_stop_follow_transformers_generate(llava_hf34, tmp_path):
    """Then with generation_config.json's eos_token_id a list holding the third token: both stop there."""
    model, processor, folder = llava_hf34
    images = [IMAGES / "rocket.jpg", IMAGES / "waterview.jpg"]
    prompts = [chatml(q) for q in PROMPT_QUESTIONS[:2]]
    common = ["--model", folder, "--max-new-tokens", "12", "--json", "--device", DEVICE, "--dtype", "f32"]
    args = [a for image, prompt in zip(images, prompts) for a in ("--image", image, "--text", prompt)]
    refs = [hf_generate(model, processor, image, prompt, 12) for image, prompt in zip(images, prompts)]
    assert [row["tokens"] for row in run_stic_json("generate", *common, *args)] == refs
    stop = refs[0][2]
    generation = json.loads((folder / "generation_config.json").read_text())
    try:
        model.generation_config.eos_token_id = [7, stop]
        (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [7, stop]}))
        stopped = [hf_generate(model, processor, image, prompt, 12) for image, prompt in zip(images, prompts)]
        got = run_stic_json("generate", *common, *args)
    finally:
        model.generation_config.eos_token_id = 7
        (folder / "generation_config.json").write_text(json.dumps(generation))
    assert stopped[0] == refs[0][:3]
    assert [row["tokens"] for row in got] == stopped
    assert got[0]["stop"] == "eos"


@pytest.mark.parametrize("layout", ["original", "llava_hf"])
def test_a_stic_trained_adapter_loads_in_peft_with_the_same_logits(llava34, llava_hf34, tmp_path, layout):
    """`train-dpo` on the chatml_direct pairs, then PEFT on the reference class (LLaVA's, transformers') with the
    adapter as stic wrote it: the logits of `stic score --adapter`."""
    from peft import PeftModel
    from test_dpo import write_pairs
    folder = llava34.folder if layout == "original" else llava_hf34[2]
    adapter = tmp_path / "adapter"
    run_stic("train-dpo", "--model", folder, "--data", write_pairs(tmp_path / "pairs.jsonl", n=2), "--image-dir",
             IMAGES, "--output", adapter, "--max-steps", "2", "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8",
             "--grad-accum", "1", "--max-length", "4096", *COMMON)
    photo, prompt = as_png(PHOTO, tmp_path), chatml("Describe the image in detail.")
    got = stic_score(folder, photo, tmp_path, "--adapter", adapter, text=prompt)
    base = stic_score(folder, photo, tmp_path, text=prompt)["logits"]
    assert (got["logits"] - base).abs().max() > 1e-3, "the adapter changed nothing"
    if layout == "original":
        # stic writes adapters in llava-hf's naming: on an original checkpoint they go to PEFT through `stic merge`
        from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
        merged = tmp_path / "merged"
        run_stic("merge", "--model", folder, "--adapter", adapter, "--output", merged)
        text = json.loads((merged / "config.json").read_text())["text_config"]
        assert (text["vocab_size"], text["eos_token_id"]) == (64064, 7)
        model = LlavaNextForConditionalGeneration.from_pretrained(merged).eval()
        assert model.generation_config.eos_token_id == 7
        processor = LlavaNextProcessor.from_pretrained(merged)
        # the merged tokenizer is transformers' conversion of the slow one (which prepends the dummy prefix that
        # Yi's sentencepiece model leaves out), as llava-hf's was made: compared in transformers' processing
        inputs = hf_inputs(processor, photo, prompt)
        got = stic_score(folder, photo, tmp_path, "--adapter", adapter, "--processing", "transformers", text=prompt)
        assert torch.equal(got["input_ids"], inputs["input_ids"][0])
        with torch.no_grad():
            ref = model(**inputs).logits[0, :, :64000]
    else:
        model, processor, _ = llava_hf34
        peft = PeftModel.from_pretrained(model, adapter).eval()
        try:
            with torch.no_grad():
                ref = peft(**hf_inputs(processor, photo, prompt)).logits[0]
        finally:
            peft.unload()
    diff = (got["logits"] - ref).abs().max().item()
    assert diff <= 1e-3, f"max |logits diff| = {diff}"


def test_special_tokens_the_tokenizer_lacks_are_refused(llava_hf34, tmp_path):
    """special_tokens_map.json of another model beside this tokenizer.json: exit 2 naming the file and the token."""
    folder = shutil.copytree(llava_hf34[2], tmp_path / "model")
    tokens = json.loads((folder / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**tokens, "bos_token": "<s>"}))
    proc = run_stic("generate", "--model", folder, "--image", IMAGES / "chelsea.png", "--text", chatml("Hi?"),
                    "--max-new-tokens", "2", *COMMON, check=False)
    assert_clean_failure(proc, folder / "tokenizer.json", "token <s> is not in the vocabulary",
                         "special_tokens_map.json or tokenizer_config.json name it")
