"""`make bench-memory`: peak host memory (RSS) of loading a 7B LLaVA checkpoint in bf16 on the CPU and scoring one
image prompt, against the size of its weights, for each layout a user downloads:

  * llava-v1.6-mistral-7b: liuhaotian/llava-v1.6-mistral-7b's files and geometry (original layout,
    `LlavaMistralForCausalLM`, vocabulary 32000, bf16 safetensors in 4 shards, the CLIP tower inside);
  * llava-v1.5-7b: liuhaotian/llava-v1.5-7b's (`LlavaLlamaForCausalLM`, f16 PyTorch pickle shards in 2 files, no
    tower) with openai/clip-vit-large-patch14-336's folder beside it (the whole CLIPModel, f32, one pickle file),
    which `mm_vision_tower` names.

The weights are random, drawn from a seed, written once under --dir (about 30 GB for both; a finished folder is
reused). Each side runs in its own subprocess, one after the other; peak RSS is the subprocess's ru_maxrss (os.wait4),
weights = the elements stic loads (the language model, the projector, the vision tower) at 2 bytes each.
Side by side, in the same run: LLaVA's own `load_pretrained_model` (llava-torch, what the official STIC code calls)
loading the same folder in bf16 and running the same forward pass.

The shards are split by tensor count, not by size. LLaVA's builder loads f16 whatever it is asked, and on a 2-core
CPU its f16 forward over the v1.6 prompt (2.9k tokens, anyres) did not finish in 20 minutes: `--no-llava` leaves
it out.

Writes results/bench/memory.json and prints the table (peak / weights: the aim is at most ~1.15).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

PROMPT = "Describe the image in detail."
RESPONSE = "A man irons clothes on a board attached to the back of a yellow taxi."
PHOTO = ROOT / "data" / "images" / "extreme_ironing.jpg"  # a COCO photo, 640x480
GIB = 1024 ** 3

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                  max_position_embeddings=32768, vocab_size=32000)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                 vocab_size=32000)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)


def llm_shapes(cls, config):
    import torch
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}


def projector_shapes(llm_hidden):
    return {"model.mm_projector.0.weight": (llm_hidden, 1024), "model.mm_projector.0.bias": (llm_hidden,),
            "model.mm_projector.2.weight": (llm_hidden, llm_hidden), "model.mm_projector.2.bias": (llm_hidden,)}


POOL = 1 << 22


def random_tensor(name, shape, dtype, generator):
    """normal(0, 0.02) values, or ones for a norm's scale. Drawing 7B values takes the CPU many minutes: a pool of
    4M draws is tiled instead (the values do not matter to memory, and they stay finite)."""
    import torch
    t = torch.empty(shape, dtype=dtype)
    if "norm" in name and name.endswith("weight"):
        return t.fill_(1.0)
    pool = (torch.randn(POOL, generator=generator) * 0.02).to(dtype)
    flat = t.view(-1)
    for start in range(0, flat.numel(), POOL):
        chunk = flat[start:start + POOL]
        chunk.copy_(pool[:chunk.numel()])
    return t


def shard(names, count):
    per = -(-len(names) // count)
    return [names[i:i + per] for i in range(0, len(names), per)]


def write_shards(folder, shapes, dtype, count, pickle):
    """Writes `shapes` as random tensors in `count` shards and an index, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    generator = torch.Generator().manual_seed(0)
    names = list(shapes)
    groups = shard(names, count)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        tensors = {n: random_tensor(n, shapes[n], dtype, generator) for n in group}
        if pickle:
            file = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
            torch.save(tensors, folder / file)
        else:
            file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
        print(f"  {folder.name}/{file}: {len(group)} tensors", file=sys.stderr, flush=True)
    index = "pytorch_model.bin.index.json" if pickle else "model.safetensors.index.json"
    size = sum(torch.Size(s).numel() * dtype.itemsize for s in shapes.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))


def llava_config(text, architecture, model_type, dtype, **settings):
    return {"architectures": [architecture], "model_type": model_type, "hidden_act": "silu", "torch_dtype": dtype,
            "tie_word_embeddings": False, "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "use_mm_proj": True, "tokenizer_model_max_length": 4096,
            "tokenizer_padding_side": "right", "bos_token_id": 1, "eos_token_id": 2, **text, **settings}


def tower_shapes():
    from transformers import CLIPModel, CLIPConfig
    config = CLIPConfig(vision_config=CLIP_L_336, text_config=dict(hidden_size=768, intermediate_size=3072,
                                                                    num_attention_heads=12, num_hidden_layers=12,
                                                                    projection_dim=768), projection_dim=768)
    return config, llm_shapes(CLIPModel, config)


def build_mistral(folder):
    import torch
    from transformers import MistralConfig, MistralForCausalLM
    shapes = llm_shapes(MistralForCausalLM, MistralConfig(**MISTRAL_7B))
    shapes.update(projector_shapes(4096))
    shapes["model.image_newline"] = (4096,)
    _, clip = tower_shapes()
    shapes.update({f"model.vision_tower.vision_tower.{k}": s for k, s in clip.items() if k.startswith("vision_model.")})
    write_shards(folder, shapes, torch.bfloat16, 4, pickle=False)
    from tiny_models import PINPOINTS
    config = llava_config(MISTRAL_7B, "LlavaMistralForCausalLM", "llava_mistral", "bfloat16",
                          image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS,
                          mm_patch_merge_type="spatial_unpad", mm_vision_tower=str(ensure_tower(folder.parent)),
                          unfreeze_mm_vision_tower=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def build_vicuna(folder):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    shapes = llm_shapes(LlamaForCausalLM, LlamaConfig(**VICUNA_7B))
    shapes.update(projector_shapes(4096))
    write_shards(folder, shapes, torch.float16, 2, pickle=True)
    config = llava_config(VICUNA_7B, "LlavaLlamaForCausalLM", "llava", "float16", image_aspect_ratio="pad",
                          mm_vision_tower=str(ensure_tower(folder.parent)))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def ensure_tower(base):
    """openai/clip-vit-large-patch14-336's folder: the whole CLIPModel in f32 in one pickle file, its configs. The
    LLaVA-1.6 checkpoint carries its own tower; its config names this folder so that LLaVA's builder finds one."""
    import torch
    from transformers import CLIPImageProcessor
    tower = base / "clip-vit-large-patch14-336"
    if not (tower / ".complete").exists():
        tower.mkdir(exist_ok=True)
        config, clip = tower_shapes()
        generator = torch.Generator().manual_seed(1)
        torch.save({n: random_tensor(n, s, torch.float32, generator) for n, s in clip.items()},
                   tower / "pytorch_model.bin")
        config.save_pretrained(tower)
        CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(tower)
        (tower / ".complete").write_text("")
    return tower


MODELS = {
    # name: (builder, stic template, LLaVA conversation mode)
    "llava-v1.6-mistral-7b": (build_mistral, "mistral_instruct", "mistral_instruct"),
    "llava-v1.5-7b": (build_vicuna, "llava_v1", "llava_v1"),
}


def ensure_model(base, name):
    folder = base / name
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"writing {folder} (random 7B weights, once)", file=sys.stderr, flush=True)
    MODELS[name][0](folder)
    from tiny_models import llava_tokenizer
    llava_tokenizer().save_pretrained(folder)
    (folder / ".complete").write_text("")
    print(f"  done in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return folder


def weight_bytes(folder):
    """The elements stic loads, at 2 bytes each (bf16): the checkpoint's tensors and the tower's vision tensors."""
    import torch
    from safetensors import safe_open
    total = 0
    for index in folder.glob("*.index.json"):
        files = set(json.loads(index.read_text())["weight_map"].values())
        for file in files:
            if file.endswith(".safetensors"):
                with safe_open(folder / file, "pt") as f:
                    total += sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
            else:
                state = torch.load(folder / file, mmap=True, weights_only=True)
                total += sum(v.numel() for v in state.values())
    tower = folder.parent / "clip-vit-large-patch14-336"
    if "llava-v1.5" in folder.name:
        state = torch.load(tower / "pytorch_model.bin", mmap=True, weights_only=True)
        total += sum(v.numel() for k, v in state.items()
                     if k.startswith("vision_model.") and not k.startswith("vision_model.post_layernorm"))
    return total * 2


def peak_rss(cmd, env=None):
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({code}):\n{err[-3000:]}")
    return usage.ru_maxrss * 1024, time.time() - started, out


def llava_worker(folder, mode):
    """LLaVA's builder and a forward pass over the image prompt and the response, in bf16 on the CPU."""
    import torch
    from PIL import Image
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    # the builder loads in f16 whatever it is asked (kwargs['torch_dtype'] = torch.float16): 2 bytes, as bf16
    tokenizer, model, image_processor, _ = load_pretrained_model(str(folder), None, folder.name, device="cpu")
    conv = conv_templates[mode].copy()
    conv.append_message(conv.roles[0], "<image>\n" + PROMPT)
    conv.append_message(conv.roles[1], RESPONSE)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    image = Image.open(PHOTO).convert("RGB")
    pixels = process_images([image], image_processor, model.config).to(model.dtype)
    with torch.inference_mode():
        logits = model(input_ids=ids, images=pixels, image_sizes=[image.size]).logits
    print(json.dumps({"positions": logits.shape[1]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(ROOT / "target" / "bench-memory"),
                        help="where the 7B checkpoints are written (once) and read")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--no-llava", action="store_true", help="measure stic only")
    parser.add_argument("--stic", default=str(ROOT / "target" / "release" / "stic"))
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "memory.json"))
    parser.add_argument("--llava-worker", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llava_worker:
        return llava_worker(Path(args.llava_worker[0]), args.llava_worker[1])
    base = Path(args.dir)
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r} (known: {', '.join(MODELS)})")
        folder = ensure_model(base, name)
        weights = weight_bytes(folder)
        template, mode = MODELS[name][1:]
        sides = {"stic": [args.stic, "score", "--model", folder, "--dtype", "bf16", "--device", "cpu",
                          "--image", PHOTO, "--prompt", PROMPT, "--response", RESPONSE, "--template", template]}
        if not args.no_llava:
            sides["LLaVA load_pretrained_model"] = [sys.executable, __file__, "--llava-worker", folder, mode]
        for side, cmd in sides.items():
            print(f"{name}: {side} ...", file=sys.stderr, flush=True)
            peak, seconds, _ = peak_rss([str(c) for c in cmd])
            rows.append({"model": name, "side": side, "weights_bytes": weights, "peak_rss_bytes": peak,
                         "peak_over_weights": peak / weights, "seconds": seconds})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"{'model':24} {'side':30} {'weights GiB':>11} {'peak RSS GiB':>12} {'peak/weights':>12}")
    for r in rows:
        print(f"{r['model']:24} {r['side']:30} {r['weights_bytes'] / GIB:11.2f} {r['peak_rss_bytes'] / GIB:12.2f} "
              f"{r['peak_over_weights']:12.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
