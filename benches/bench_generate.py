"""`make bench-generate`: decode tokens/s and prefill time of `stic generate` against transformers' `generate`
on the same random model, image and prompt, measured in one run on this machine. Both sides run once before the
timed runs (warm-up); prefill = image encoding + the prompt's forward pass + the first token, on both sides.

CPU (default): a few-hundred-million-parameter model with the real LLaVA-v1.6-Mistral-7B layer shapes scaled
down (head_dim 128, 4:1 grouped-query attention, SwiGLU ratio 3.5, CLIP 336/14 anyres tiles).
--full-size (CUDA): random weights with the exact 7B shapes, bf16; also reports peak GPU memory.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
import tiny_models  # noqa: E402

ROOT = tiny_models.ROOT
STIC = ROOT / "target" / "release" / "stic"
PROMPT = "[INST] <image>\nDescribe the image in detail. [/INST]"


def model_config(full_size):
    if full_size:
        return tiny_models.benchmark_config(*tiny_models.FULL_SIZE)
    return tiny_models.benchmark_config(
        dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16))


def hf_generate(model, inputs, new_tokens, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=32001)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def stic_generate(folder, image, new_tokens, batch, device, dtype):
    args = [str(STIC), "generate", "--model", str(folder), "--image", str(image), "--max-new-tokens", str(new_tokens),
            "--ignore-eos", "--warmup", "--json", "--device", device, "--dtype", dtype]
    for _ in range(batch):
        args += ["--text", PROMPT]
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return rows[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side, alternating; medians reported")
    parser.add_argument("--image", default=str(ROOT / "data" / "images" / "chelsea.png"))
    parser.add_argument("--model-dir", default=None,
                        help="save the random model here, or reuse the one already there (bench-train shares it)")
    args = parser.parse_args()
    device = "cuda" if args.full_size else "cpu"
    if args.full_size and not torch.cuda.is_available():
        sys.exit("--full-size needs a CUDA GPU")
    dtype = torch.bfloat16 if args.full_size else torch.float32
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir or Path(tmp) / "model")
        model = tiny_models.random_model_folder(model_config(args.full_size), folder, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        processor = tiny_models.processor()
        inputs = processor(images=Image.open(args.image), text=PROMPT, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        prompt_tokens = inputs["input_ids"].shape[1]
        hf_generate(model, inputs, 2, device)  # warm-up
        stic_dtype = "bf16" if args.full_size else "f32"
        # the sides alternate, so that a machine whose speed drifts (shared cores) affects both alike
        hf_prefills, hf_decodes, ones, manys = [], [], [], []
        for _ in range(args.repeats):
            hf_prefill, _ = hf_generate(model, inputs, 1, device)
            hf_total, _ = hf_generate(model, inputs, n, device)
            hf_prefills.append(hf_prefill)
            hf_decodes.append((n - 1) / (hf_total - hf_prefill))
            ones.append(stic_generate(folder, args.image, n, 1, device, stic_dtype))
            manys.append(stic_generate(folder, args.image, n, args.batch, device, stic_dtype))
        hf_reserved = torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None
    hf_prefill, hf_decode = statistics.median(hf_prefills), statistics.median(hf_decodes)
    stic_prefill = statistics.median(o["prefill_seconds"] for o in ones)
    stic_batch_prefill = statistics.median(m["prefill_seconds"] for m in manys)
    stic_decode = statistics.median((n - 1) / o["decode_seconds"] for o in ones)
    stic_batch_decode = statistics.median(args.batch * (n - 1) / m["decode_seconds"] for m in manys)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "parameters": params, "prompt_tokens": prompt_tokens, "new_tokens": n,
        "hf_prefill_s": hf_prefill, "hf_decode_tok_s": hf_decode,
        "repeats": args.repeats, "statistic": "median over the repeats",
        "stic_prefill_s": stic_prefill, "stic_decode_tok_s": stic_decode,
        "stic_batch": args.batch, "stic_batch_decode_tok_s": stic_batch_decode,
        "decode_ratio_stic_over_hf": stic_decode / hf_decode,
        "prefill_ratio_hf_over_stic": hf_prefill / stic_prefill,
        "batch_speedup": stic_batch_decode / stic_decode,
        "runs": {"hf_decode_tok_s": hf_decodes, "hf_prefill_s": hf_prefills,
                 "stic_decode_tok_s": [(n - 1) / o["decode_seconds"] for o in ones],
                 "stic_prefill_s": [o["prefill_seconds"] for o in ones],
                 "stic_batch_decode_tok_s": [args.batch * (n - 1) / m["decode_seconds"] for m in manys]},
    }
    if device == "cuda":
        result["stic_gpu_memory_gib"] = ones[0].get("gpu_memory_gib")  # nvidia-smi: allocator cache + CUDA context
        result["hf_max_memory_reserved_gib"] = hf_reserved
    out = ROOT / "results" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("generate-full.json" if args.full_size else "generate.json")).write_text(json.dumps(result, indent=2))
    print(f"model: {params / 1e6:.0f}M parameters, {prompt_tokens} prompt tokens, {n} new tokens, {result['device']}; "
          f"medians of {args.repeats} alternating runs")
    print(f"{'':24}{'prefill s':>12}{'decode tok/s':>14}")
    print(f"{'transformers (batch 1)':24}{hf_prefill:12.3f}{hf_decode:14.1f}")
    print(f"{'stic (batch 1)':24}{stic_prefill:12.3f}{stic_decode:14.1f}")
    print(f"{f'stic (batch {args.batch})':24}{stic_batch_prefill:12.3f}{stic_batch_decode:14.1f}")
    print(f"decode: stic/transformers = {result['decode_ratio_stic_over_hf']:.2f}x; "
          f"prefill: transformers/stic = {result['prefill_ratio_hf_over_stic']:.2f}x; "
          f"batch {args.batch} vs 1 = {result['batch_speedup']:.2f}x")


if __name__ == "__main__":
    main()
