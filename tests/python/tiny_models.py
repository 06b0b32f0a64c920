"""Small random LLaVA-NeXT models (Mistral or Llama decoder) built with transformers, in every weight layout stic
reads."""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlamaConfig, LlavaNextImageProcessor, LlavaNextProcessor, MistralConfig,
                          PreTrainedTokenizerFast)

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "third_party" / "mistral-7b-tokenizer"
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# name -> (text config overrides, vision config overrides)
VARIANTS = {
    # grouped-query attention 4:2, two decoder layers
    "gqa": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)),
    # multi-query attention, three layers, a sliding window shorter than any image prompt
    "mqa_window": (dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=12, sliding_window=100, rope_theta=1e6),
                   dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)),
    # plain multi-head attention; CLIP head_dim 64 like ViT-L (the original LLaVA config does not store it)
    "mha": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5),
            dict(hidden_size=128, intermediate_size=160, num_hidden_layers=3, num_attention_heads=2)),
}

# LLaVA-NeXT on a Llama decoder, as llava-hf/llava-v1.6-vicuna-7b-hf is (`LlamaConfig`: no sliding window, RoPE theta
# 1e4, untied embeddings, all by LlamaConfig's defaults); name -> (text, vision config overrides)
LLAMA_VARIANTS = {
    # multi-head attention, as Vicuna-7B/13B have it
    "llama_mha": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=4096),
                  dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)),
    # grouped-query attention 4:2, as Yi-34B has it
    "llama_gqa": (dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5),
                  dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
}


# LLaVA-v1.6-Mistral-7B's shapes (text, vision); the benchmarks scale them down on the CPU
FULL_SIZE = (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8),
             dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16))


def benchmark_config(text, vision):
    """A LLaVA-NeXT-Mistral config as the 7B model has it (vocabulary, RoPE theta, 336/14 CLIP with anyres tiles,
    feature layer -2), with the given decoder and vision-tower shapes."""
    return LlavaNextConfig(
        text_config=MistralConfig(vocab_size=32064, rope_theta=1e6, max_position_embeddings=32768,
                                  sliding_window=None, **text),
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **vision),
        image_token_index=32000, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default")


def shapes_only(config):
    """The model on the meta device: parameter names and shapes, no memory."""
    with torch.device("meta"):
        return LlavaNextForConditionalGeneration(config)


def tokenizer():
    tok = PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    tok.model_input_names = ["input_ids", "attention_mask"]  # LLaVA takes no token_type_ids
    return tok


def processor():
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=PINPOINTS, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_model(variant, seed=0):
    """A variant of VARIANTS (Mistral) or LLAMA_VARIANTS, with random weights."""
    if variant in LLAMA_VARIANTS:
        text, vision = LLAMA_VARIANTS[variant]
        text_config = LlamaConfig(vocab_size=32002, **text)
    else:
        text, vision = VARIANTS[variant]
        text_config = MistralConfig(vocab_size=32002, max_position_embeddings=8192, **{"sliding_window": None, **text})
    config = LlavaNextConfig(
        text_config=text_config,
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **vision),
        image_token_index=32000, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # random norms and biases, so that every parameter matters for parity
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model


def save_hf(model, out):
    """llava-hf layout as transformers saves it (older `language_model.model.*` keys)."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    processor().save_pretrained(out)
    return out


def random_model_folder(config, folder, device="cpu", dtype=torch.float32, load=True):
    """Random weights for `config` saved in the llava-hf layout under `folder` (seed 0, initialised on `device` in
    `dtype`: 7B parameters on a CPU take minutes). A folder that already holds a model of the same shapes is reused,
    so that the benchmarks can share one full-size model. Returns the model, or None when it was reused and `load`
    is false."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    folder = Path(folder)
    shapes = lambda c: (c.text_config.to_dict(), c.vision_config.to_dict())  # noqa: E731
    if (folder / "config.json").exists():
        saved = LlavaNextConfig.from_pretrained(folder)
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if any(shapes(saved)[i].get(k) != shapes(config)[i].get(k) for i in (0, 1) for k in keys):
            raise SystemExit(f"{folder} holds a model of other shapes: remove it or name another folder")
        if not load:
            return None
        return LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    save_hf(model, folder)
    return model


def to_new_hf_layout(src, dst):
    """The newer llava-hf key names (`model.language_model.*`, top-level `lm_head`), sharded in two files."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    tensors = load_file(src / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("language_model.lm_head."):
            k = k[len("language_model."):]
        else:
            k = "model." + k
        renamed[k] = v
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: renamed[k].contiguous() for k in keys}, dst / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def to_original_layout(src, dst):
    """The original LLaVA `LlavaMistralForCausalLM` layout and config (no vision config, no processor files)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, dst / f)
    hf = json.loads((src / "config.json").read_text())
    text = hf["text_config"]
    config = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                   "num_key_value_heads", "rms_norm_eps", "rope_theta", "sliding_window",
                                   "vocab_size", "max_position_embeddings", "head_dim")}
    config.update({
        "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "hidden_act": "silu",
        "image_aspect_ratio": "anyres", "image_grid_pinpoints": hf["image_grid_pinpoints"],
        "mm_hidden_size": hf["vision_config"]["hidden_size"], "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_use_im_start_end": False,
        "tie_word_embeddings": False})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    renamed = {}
    for k, v in load_file(src / "model.safetensors").items():
        if k.startswith("language_model.model."):
            k = "model." + k[len("language_model.model."):]
        elif k.startswith("language_model.lm_head."):
            k = k[len("language_model."):]
        elif k.startswith("vision_tower."):
            k = "model.vision_tower." + k
        elif k.startswith("multi_modal_projector.linear_1."):
            k = "model.mm_projector.0." + k[len("multi_modal_projector.linear_1."):]
        elif k.startswith("multi_modal_projector.linear_2."):
            k = "model.mm_projector.2." + k[len("multi_modal_projector.linear_2."):]
        elif k == "image_newline":
            k = "model.image_newline"
        renamed[k] = v
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# Original LLaVA checkpoints, built and saved by LLaVA's own code (PyPI llava-torch, haotian-liu/LLaVA's anyres
# release) the way liuhaotian/llava-v1.6-mistral-7b was made: `LlavaMistralForCausalLM` with vocabulary 32000,
# the CLIP tower loaded from its own folder (`mm_vision_tower`) and trained with the model, so that its weights are
# in the checkpoint, the slow tokenizer saved beside the weights, no processor files.
LLAVA_TOWER_NAME = "openai/clip-vit-large-patch14-336"  # what the shipped config names; stic reads the checkpoint
LLAVA_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rope_theta=1e6, sliding_window=None,
                  max_position_embeddings=8192, rms_norm_eps=1e-5)
# head_dim 64 like ViT-L: the original config does not store the tower's head count, stic reads it off the widths
LLAVA_CLIP = dict(hidden_size=128, intermediate_size=160, num_hidden_layers=3, num_attention_heads=2,
                  image_size=336, patch_size=14)


def mistral_sentencepiece():
    import mistral_common
    return Path(mistral_common.__file__).resolve().parent / "data" / "tokenizer.model.v1"


def llava_tokenizer():
    """The tokenizer LLaVA's train.py saves: Mistral's sentencepiece model as the slow LlamaTokenizer, pad = unk."""
    from transformers import LlamaTokenizer
    tok = LlamaTokenizer(vocab_file=str(mistral_sentencepiece()), legacy=True, add_bos_token=True, add_eos_token=False)
    tok.pad_token = tok.unk_token
    return tok


# Yi's special pieces (LLaVA-v1.6-34B's tokenizer): ids 1, 2 and 6 to 8; 3 to 5 are placeholders here
YI_CONTROL = ["<|startoftext|>", "<|endoftext|>", "<|reserved_3|>", "<|reserved_4|>", "<|reserved_5|>",
              "<|im_start|>", "<|im_end|>", "<|im_sep|>"]
YI_VOCAB = 64000


def yi_sentencepiece(path, add_dummy_prefix=False):
    """A sentencepiece BPE model laid out as Yi's: 64000 pieces, `<|startoftext|>` 1, `<|endoftext|>` 2,
    `<|im_start|>` 6 and `<|im_end|>` 7 as control pieces, byte fallback, and (as Yi's) no dummy prefix. Its
    merges are Mistral's pieces, moved up by the six extra control pieces; unused pieces fill it to 64000."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(mistral_sentencepiece().read_bytes())
    piece = pb.ModelProto.SentencePiece
    pieces = [proto.pieces[0]] + [piece(piece=p, score=0.0, type=piece.CONTROL) for p in YI_CONTROL]
    pieces += list(proto.pieces[3:])
    pieces += [piece(piece=f"<|unused_{i}|>", score=0.0, type=piece.UNUSED) for i in range(YI_VOCAB - len(pieces))]
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    proto.trainer_spec.bos_piece, proto.trainer_spec.eos_piece = YI_CONTROL[:2]
    proto.trainer_spec.vocab_size = YI_VOCAB
    proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    Path(path).write_bytes(proto.SerializeToString())
    return Path(path)


def yi_tokenizer(folder, add_dummy_prefix=False):
    """The slow tokenizer LLaVA-v1.6-34B ships (Nous-Hermes-2-Yi-34B's): `LlamaTokenizer` on the Yi model, no BOS
    added, `<|startoftext|>` / `<|im_end|>` as BOS / EOS, pad = unk, `<|endoftext|>`, `<|im_start|>` and `<|im_end|>`
    special added tokens. Written to `folder`, and returned as LLaVA's builder loads it."""
    from transformers import AddedToken, AutoTokenizer, LlamaTokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = yi_sentencepiece(folder / "yi.model", add_dummy_prefix)
    tok = LlamaTokenizer(vocab_file=str(model), legacy=True, add_bos_token=False, add_eos_token=False,
                         bos_token="<|startoftext|>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<unk>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False)
                    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.save_pretrained(folder)
    model.unlink()
    return AutoTokenizer.from_pretrained(folder, use_fast=False)


def llava_find_all_linear_names(model):
    """LLaVA's own `find_all_linear_names` (llava/train/train.py). Its module imports a name transformers 4.57 no
    longer has (ALL_LAYERNORM_LAYERS, used by LLaVA's trainer only): it is supplied before the import."""
    import transformers.trainer
    if not hasattr(transformers.trainer, "ALL_LAYERNORM_LAYERS"):
        transformers.trainer.ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]
    from llava.train.train import find_all_linear_names
    return find_all_linear_names(model)


def build_llava_original(folder, seed=0):
    """Builds a tiny LLaVA-v1.6-Mistral with LLaVA's classes, saves it to `folder` as LLaVA does and returns
    (model, slow tokenizer, the tower's CLIPImageProcessor)."""
    from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
    return build_llava_checkpoint(folder, LlavaMistralConfig, LlavaMistralForCausalLM, LLAVA_TEXT, seed,
                                  mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                                  unfreeze_mm_vision_tower=True)


# LLaVA-v1.5 and LLaVA-v1.6-Vicuna's decoder (`LlavaLlamaForCausalLM`, a LlamaConfig: multi-head attention, no
# sliding window, RoPE theta 1e4)
LLAVA_LLAMA_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5)


def build_llava_llama_original(folder, seed=0, tower_inside=True, text=None, **settings):
    """A tiny `LlavaLlamaForCausalLM` as LLaVA saves it. `tower_inside=False` is LLaVA-v1.5: the tower was frozen
    (no `unfreeze_mm_vision_tower`), so the model is built without it, saves no tower tensors, and loads the tower
    from its folder (`mm_vision_tower`) as LLaVA's builder does; `settings` are further config entries."""
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    return build_llava_checkpoint(folder, LlavaConfig, LlavaLlamaForCausalLM, text or LLAVA_LLAMA_TEXT, seed,
                                  unfreeze_mm_vision_tower=tower_inside, **settings)


def randomise_norms_and_biases(model):
    """Random norms, biases and newline, so that every parameter matters for parity."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias") or name.endswith("image_newline"):
                p.copy_(0.02 * torch.randn_like(p))


def build_llava_checkpoint(folder, config_cls, model_cls, text, seed, unfreeze_mm_vision_tower, save_kwargs=None,
                           tower_name=LLAVA_TOWER_NAME, tokenizer=None, vocab_size=32000, **settings):
    """Builds a tiny original-layout LLaVA with LLaVA's classes, the CLIP tower in its own folder beside it, saves it
    as LLaVA does (`save_kwargs` for `save_pretrained`), writes `tower_name` into mm_vision_tower (None: the tower
    folder's path) and returns (model, slow tokenizer, the tower's CLIPImageProcessor). The tokenizer is Mistral's
    unless `tokenizer` (a slow tokenizer of `vocab_size` pieces) is given."""
    from transformers import CLIPImageProcessor, CLIPVisionModel
    folder = Path(folder)
    tower = folder.parent / f"{folder.name}-clip-tower"
    torch.manual_seed(seed)
    clip = CLIPVisionModel(CLIPVisionConfig(**LLAVA_CLIP))
    randomise_norms_and_biases(clip)
    clip.save_pretrained(tower)
    # openai/clip-vit-large-patch14-336's preprocessor (CLIP mean and std are the class defaults)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(tower)
    config = config_cls(
        vocab_size=vocab_size, **text,
        mm_vision_tower=str(tower), mm_hidden_size=LLAVA_CLIP["hidden_size"], mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_grid_pinpoints=PINPOINTS,
        mm_use_im_start_end=False, mm_use_im_patch_token=False, use_mm_proj=True, tokenizer_model_max_length=4096,
        tokenizer_padding_side="right", tie_word_embeddings=False,
        **({"unfreeze_mm_vision_tower": True} if unfreeze_mm_vision_tower else {}), **settings)
    model = model_cls(config).eval()
    randomise_norms_and_biases(model)
    model.save_pretrained(folder, **(save_kwargs if save_kwargs is not None else {"safe_serialization": True}))
    if not unfreeze_mm_vision_tower:
        model.get_vision_tower().load_model()  # what LLaVA's builder does after from_pretrained
    shipped = json.loads((folder / "config.json").read_text())
    shipped["mm_vision_tower"] = tower_name or str(tower)
    (folder / "config.json").write_text(json.dumps(shipped, indent=2))
    tokenizer = tokenizer or llava_tokenizer()
    tokenizer.save_pretrained(folder)
    return model, tokenizer, model.get_vision_tower().image_processor
