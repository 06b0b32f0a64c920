"""Config values and adapter configs that cannot work, or that would change the maths in a way stic does not
implement: each ends with exit 2 and a message naming the file and the setting, never a panic, an abort, NaN or a
silent default. One table row each; the rows edit a copy of a tiny llava-hf model (or of a PEFT adapter)."""
import json
import shutil

import pytest

import tiny_models
from conftest import IMAGES, run_stic
from test_dpo import peft_adapter, write_pairs
from test_errors import assert_clean_failure


def text(**values):
    return lambda cfg: cfg["text_config"].update(values)


def vision(**values):
    return lambda cfg: cfg["vision_config"].update(values)


def top(**values):
    return lambda cfg: cfg.update(values)


# (id, file of the model folder, edit of its JSON, phrases of the message)
MODEL_CASES = [
    ("heads_zero", "config.json", text(num_attention_heads=0), ["config.json", "text_config.num_attention_heads is 0"]),
    ("kv_heads_not_dividing", "config.json", text(num_key_value_heads=3), ["not a multiple of num_key_value_heads 3"]),
    ("patch_size_zero", "config.json", vision(patch_size=0), ["config.json", "vision_config.patch_size is 0"]),
    ("text_config_list", "config.json", top(text_config=[]), ["config.json", "text_config is []", "must be an object"]),
    ("image_token_outside_vocab", "config.json", top(image_token_index=999999),
     ["config.json", "image_token_index 999999 is not a token of the vocabulary", "<image>"]),
    ("crop_size_zero", "preprocessor_config.json", top(crop_size={"height": 0, "width": 0}),
     ["preprocessor_config.json", "crop_size 0 differs from vision_config.image_size 336"]),
    ("crop_not_square", "preprocessor_config.json", top(crop_size={"height": 336, "width": 224}), ["square tiles"]),
    ("crop_not_the_tower_size", "preprocessor_config.json", top(crop_size={"height": 224, "width": 224}),
     ["crop_size 224 differs from vision_config.image_size 336"]),
    ("shortest_edge_zero", "preprocessor_config.json", top(size={"shortest_edge": 0}),
     ["preprocessor_config.json", "shortest_edge is 0"]),
    ("pinpoints_empty", "preprocessor_config.json", top(image_grid_pinpoints=[]),
     ["preprocessor_config.json", "image_grid_pinpoints is empty"]),
    ("pinpoints_zero", "preprocessor_config.json", top(image_grid_pinpoints=[[0, 0]]), ["image_grid_pinpoints has [0, 0]"]),
    ("pinpoints_huge", "preprocessor_config.json", top(image_grid_pinpoints=[[67200, 67200]]),
     ["image_grid_pinpoints has [67200, 67200]", "40000 tiles"]),
    ("pinpoints_differ", "config.json", top(image_grid_pinpoints=[[672, 672]]),
     ["image_grid_pinpoints of", "differ from those of", "config.json"]),
    ("image_std_zero", "preprocessor_config.json", top(image_std=[0, 0, 0]), ["preprocessor_config.json", "image_std has 0"]),
    ("resample_bilinear", "preprocessor_config.json", top(resample=2), ["resample is 2", "bicubic"]),
    ("normalize_off", "preprocessor_config.json", top(do_normalize=False), ["do_normalize is false"]),
    # settings that change the maths: transformers 5 spellings, then transformers 4 ones
    ("rope_linear", "config.json", text(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     ["text_config.rope_parameters has rope_type \"linear\"", "default"]),
    ("rope_yarn_v4", "config.json", text(rope_scaling={"type": "yarn", "factor": 4.0}), ["rope_scaling has rope_type \"yarn\""]),
    ("rope_factor_unknown", "config.json", text(rope_parameters={"rope_type": "default", "factor": 2.0}),
     ["rope_parameters.factor is 2.0"]),
    ("rope_partial", "config.json", text(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
     ["rope_parameters.partial_rotary_factor is 0.5"]),
    ("rope_theta_conflict", "config.json", text(rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
     ["make them equal"]),
    ("quantized", "config.json", top(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
     ["quantization_config is", "dequantized"]),
    ("attention_bias", "config.json", text(attention_bias=True), ["text_config.attention_bias is true"]),
    ("layer_types", "config.json", text(layer_types=["sliding_attention", "full_attention"]), ["text_config.layer_types"]),
    ("text_act_gelu", "config.json", text(hidden_act="gelu"), ["hidden_act 'gelu' is not supported"]),
    ("projector_act", "config.json", top(projector_hidden_act="relu"), ["projector_hidden_act 'relu'"]),
    ("projector_without_bias", "config.json", top(multimodal_projector_bias=False), ["multimodal_projector_bias is false"]),
    ("text_qwen2", "config.json", text(model_type="qwen2"),
     ["text_config.model_type is 'qwen2'", "Mistral and Llama decoders only", "mistral or llama"]),
    ("vision_siglip", "config.json", vision(model_type="siglip_vision_model"), ["'siglip_vision_model'"]),
]


@pytest.fixture
def model_copy(hf_models, tmp_path):
    _, folder = hf_models["gqa"]
    return shutil.copytree(folder, tmp_path / "model")


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def score(model, *extra):
    return run_stic("score", "--model", model, "--image", IMAGES / "chelsea.png", "--prompt", "What is shown?",
                    "--response", "A cat.", "--device", "cpu", *extra, check=False, timeout=120)


@pytest.mark.parametrize("file,edit,phrases", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model_config(model_copy, file, edit, phrases):
    edit_json(model_copy / file, edit)
    assert_clean_failure(score(model_copy), *phrases)


def test_processor_config_disagreeing_with_preprocessor_config(model_copy):
    """transformers 5 reads the nested image processor first, transformers 4 preprocessor_config.json."""
    nested = json.loads((model_copy / "preprocessor_config.json").read_text())
    nested["image_mean"] = [0.5, 0.5, 0.5]
    edit_json(model_copy / "processor_config.json", lambda cfg: cfg.update(image_processor=nested))
    assert_clean_failure(score(model_copy), "preprocessor_config.json", "processor_config.json", "different image settings")
    (model_copy / "preprocessor_config.json").unlink()  # alone, the nested one is what counts
    assert score(model_copy).returncode == 0


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A PEFT adapter of rank 4 for the gqa model."""
    out, _ = peft_adapter(tiny_models.build_model("gqa", seed=0), tmp_path_factory.mktemp("adapter") / "adapter")
    return out


def config(**values):
    return lambda cfg: cfg.update(values)


ADAPTER_CASES = [
    ("alpha_string", config(lora_alpha="big"), ["adapter_config.json", "lora_alpha is \"big\"", "number"]),
    ("alpha_zero", config(lora_alpha=0), ["lora alpha is 0"]),
    ("dropout_above_one", config(lora_dropout=1.5), ["lora dropout is 1.5"]),
    ("rank_zero", config(r=0), ["lora r is 0"]),
    ("rank_not_the_tensors", config(r=8), ["has rank 4 but", "says r 8"]),
    ("rank_float", config(r=4.5), ["r is 4.5", "whole number"]),
    ("dora", config(use_dora=True), ["adapter_config.json", "use_dora is true", "plain LoRA"]),
    ("lora_bias", config(lora_bias=True), ["lora_bias is true"]),
    ("bias_all", config(bias="all"), ["bias is \"all\""]),
    ("unknown_option", config(use_qalora=True), ["use_qalora is true"]),
    ("rank_pattern", config(rank_pattern={"q_proj": 8}), ["rank_pattern is not supported"]),
    ("not_lora", config(peft_type="IA3"), ["peft_type is \"IA3\""]),
]


def bad_adapter(adapter, tmp_path, edit):
    bad = shutil.copytree(adapter, tmp_path / "adapter")
    edit_json(bad / "adapter_config.json", edit)
    return bad


@pytest.mark.parametrize("edit,phrases", [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter_config(hf_models, adapter, tmp_path, edit, phrases):
    _, folder = hf_models["gqa"]
    assert_clean_failure(score(folder, "--adapter", bad_adapter(adapter, tmp_path, edit)), *phrases)


MERGE_CASES = ["alpha_string", "rank_zero", "rank_not_the_tensors", "dora"]


@pytest.mark.parametrize("edit,phrases", [c[1:] for c in ADAPTER_CASES if c[0] in MERGE_CASES], ids=MERGE_CASES)
def test_merge_refuses_bad_adapter_config(hf_models, adapter, tmp_path, edit, phrases):
    _, folder = hf_models["gqa"]
    proc = run_stic("merge", "--model", folder, "--adapter", bad_adapter(adapter, tmp_path, edit),
                    "--output", tmp_path / "merged", check=False)
    assert_clean_failure(proc, *phrases)
    assert not (tmp_path / "merged").exists(), "merge left an output behind"


@pytest.mark.parametrize("flags,phrase", [
    (["--lora-dropout", "1.5"], "lora dropout is 1.5"),
    (["--lora-dropout=-0.1"], "lora dropout is -0.1"),
    (["--lora-alpha", "nan"], "lora alpha is NaN"),
    (["--lora-alpha=-1"], "lora alpha is -1"),
], ids=["dropout_1.5", "dropout_negative", "alpha_nan", "alpha_negative"])
def test_bad_lora_training_settings(hf_models, tmp_path, flags, phrase):
    _, folder = hf_models["gqa"]
    proc = run_stic("train-dpo", "--model", folder, "--data", write_pairs(tmp_path / "pairs.jsonl", n=1),
                    "--image-dir", IMAGES, "--output", tmp_path / "out", "--max-steps", "1", *flags,
                    check=False, timeout=120)
    assert_clean_failure(proc, phrase)
