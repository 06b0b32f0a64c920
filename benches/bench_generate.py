"""`make bench-generate`: generation throughput on the pipeline's own workload, three ways in one run: stic's
static batches (what stic did before its engine; `stic generate --static-batching`), stic's continuous-batching
engine, and transformers' `generate` at its best batch size. Same random model, same requests, greedy, and the
outputs are compared token for token.

The workload, mixed in one run (request order as a job would submit them):
- stage 1: N images x (preferred prompt + dispreferred prompt); the dispreferred one is the hallucination prompt on
  the same image for even images and a description prompt on the image corrupted to a 20-pixel shorter side
  (stage 1's `resize20`) for odd ones;
- evaluation: M images x (one DaR description + Q short questions).
Response lengths are realistic and varied, drawn once from a seeded schedule and forced identically on every side
(descriptions uniform in [--min-description, --max-description] tokens, answers uniform in [1, --max-answer]): stic
writes each row's length + 1 tokens (`max_new_tokens` per request, EOS ignored), transformers the same length
followed by an EOS that a logits processor forces at that step; the first `length` tokens are compared.

Reported per side: generated tokens/s (the goal ratios use this, on the mixed workload), prefill tokens/s (prompt
tokens of all requests / prefill seconds, image encoding included), images/s (distinct source images / seconds) and
peak memory (resident set on the CPU; GPU memory on CUDA). Also an estimate of the whole `make reproduce`
generation time at the measured engine rates (see `estimate_reproduce`).

CPU (default): a model with the 7B layer shapes scaled down (142M language-model parameters: head_dim 128, 4:1 GQA,
SwiGLU 3.5; one CLIP-L layer of 336/14 anyres tiles, which keeps the tower's share of the prefill near the 7B
model's). Wall times on a shared machine drift; the ratios are also given on CPU time. --full-size (CUDA): the exact 7B shapes in bf16, and a larger workload.
"""
import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
import tiny_models  # noqa: E402
from reproduce_workload import estimate_reproduce  # noqa: E402

ROOT = tiny_models.ROOT
STIC = ROOT / "target" / "release" / "stic"
PROMPTS = json.loads((ROOT / "third_party" / "stic" / "prompts.json").read_text())
IMAGES = sorted(p for p in (ROOT / "data" / "images").iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
EOS = 2
QUESTIONS = ["What is the main object in the image?", "How many people are there?", "What colour is the largest object?",
             "Is it daytime or night?", "Where was this photo taken?", "Is there any text in the image?",
             "What is in the background?", "Answer with a single word: indoors or outdoors?"]

def model_config(full_size):
    if full_size:
        return tiny_models.benchmark_config(*tiny_models.FULL_SIZE)
    return tiny_models.benchmark_config(
        dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2),
        # one CLIP-L layer in use (LLaVA reads layer -2): the tower costs about 1/8 of the decoder's prefill, as
        # at 7B (24 layers beside 32), so that sharing an image's encoding is not overrated
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16))


def raw_prompt(text):
    return f"[INST] <image>\n{text} [/INST]"


def workload(args, tmp):
    """Requests in submission order: {image, text, length, part}."""
    rng = random.Random(args.seed)
    pick = lambda i: IMAGES[i % len(IMAGES)]  # noqa: E731
    description = lambda: rng.randint(args.min_description, args.max_description)  # noqa: E731
    requests = []
    for i in range(args.images):
        image = pick(i)
        requests.append(dict(image=image, text=raw_prompt(PROMPTS["preferred_prompt"]), length=description(),
                             part="stage1", kind="preferred", source=image.name))
        if i % 2 == 0:
            requests.append(dict(image=image, text=raw_prompt(rng.choice(PROMPTS["hallucination_prompts"])),
                                 length=description(), part="stage1", kind="hallucination", source=image.name))
        else:
            img = Image.open(image).convert("RGB")
            scale = 20 / min(img.size)
            corrupted = tmp / f"resize20-{image.stem}.png"
            img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC).save(corrupted)
            requests.append(dict(image=corrupted, text=raw_prompt(rng.choice(PROMPTS["description_prompts"])),
                                 length=description(), part="stage1", kind="corrupted", source=image.name))
    for i in range(args.eval_images):
        image = pick(args.images + i)
        requests.append(dict(image=image, text=raw_prompt(PROMPTS["dar_description_prompt"]), length=description(),
                             part="eval", kind="description", source="eval-" + image.name))
        for q in range(args.questions):
            requests.append(dict(image=image, text=raw_prompt(QUESTIONS[q % len(QUESTIONS)]),
                                 length=rng.randint(1, args.max_answer), part="eval", kind="question",
                                 source="eval-" + image.name))
    return requests


def run_stic(folder, requests, tmp, device, dtype, batch, static, extra=()):
    lines = tmp / "requests.jsonl"
    lines.write_text("".join(json.dumps({"image": str(r["image"]), "text": r["text"], "max_new_tokens": r["length"] + 1})
                             + "\n" for r in requests))
    stats = tmp / "stats.json"
    cmd = [str(STIC), "generate", "--model", str(folder), "--requests", str(lines), "--ignore-eos", "--warmup", "--json",
           "--device", device, "--dtype", dtype, "--batch-size", str(batch), "--stats-out", str(stats), *extra]
    if static:
        cmd.append("--static-batching")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"stic generate failed:\n{proc.stderr}")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    s = json.loads(stats.read_text())
    return dict(tokens=[r["tokens"] for r in rows], prompt_rows=[r["prompt_tokens"] for r in rows], seconds=s["seconds"],
                cpu_seconds=s["cpu_seconds"],
                prefill_seconds=s["prepare_seconds"] + s["prefill_seconds"], decode_seconds=s["decode_seconds"],
                generated=s["generated_tokens"], prompt_tokens=s["prompt_tokens"], images_encoded=s["images_encoded"],
                peak_gib=s["gpu_memory_gib"] if device == "cuda" else s["peak_rss_gib"], engine=s.get("engine"))


def hf_worker(args):
    """Runs the requests through transformers' generate in batches of --hf-batch (in this process)."""
    from transformers import LlavaNextForConditionalGeneration, LogitsProcessor, LogitsProcessorList
    device = "cuda" if args.full_size else "cpu"
    dtype = torch.bfloat16 if args.full_size else torch.float32
    model = LlavaNextForConditionalGeneration.from_pretrained(args.model_dir, dtype=dtype, device_map=device).eval()
    processor = tiny_models.processor()
    processor.tokenizer.padding_side = "left"
    requests = [json.loads(line) for line in Path(args.hf_requests).read_text().splitlines()]

    class ForceLengths(LogitsProcessor):
        """EOS exactly after each row's length; records when the first step's logits arrive (end of prefill)."""
        def __init__(self, lengths, prompt_len):
            self.lengths, self.prompt_len, self.first = lengths, prompt_len, None

        def __call__(self, input_ids, scores):
            if self.first is None:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.first = time.perf_counter()
            step = input_ids.shape[1] - self.prompt_len
            for row, length in enumerate(self.lengths):
                if step == length:
                    scores[row] = float("-inf")
                    scores[row, EOS] = 0
            return scores

    def run(batch_requests):
        images = [Image.open(r["image"]) for r in batch_requests]
        inputs = processor(images=images, text=[r["text"] for r in batch_requests], padding=True, return_tensors="pt")
        inputs.pop("token_type_ids", None)
        inputs = inputs.to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        lengths = [r["length"] for r in batch_requests]
        force = ForceLengths(lengths, inputs["input_ids"].shape[1])
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max(lengths) + 1, do_sample=False, pad_token_id=32001,
                                 logits_processor=LogitsProcessorList([force]))
        if device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        prompt_tokens = int(inputs["attention_mask"].sum())
        return [row[:n] for row, n in zip(new, lengths)], end - start, force.first - start, prompt_tokens

    run([dict(requests[0], length=1)])  # warm-up
    tokens, seconds, prefill, prompt_tokens = [], 0.0, 0.0, 0
    cpu_started = time.process_time()
    for i in range(0, len(requests), args.hf_batch):
        t, s, p, n = run(requests[i:i + args.hf_batch])
        tokens += t
        seconds += s
        prefill += p
        prompt_tokens += n
    cpu_seconds = time.process_time() - cpu_started
    peak = (torch.cuda.max_memory_reserved() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    generated = sum(r["length"] + 1 for r in requests)
    print(json.dumps(dict(tokens=tokens, seconds=seconds, cpu_seconds=cpu_seconds, prefill_seconds=prefill, decode_seconds=seconds - prefill,
                          generated=generated, prompt_tokens=prompt_tokens, images_encoded=len(requests),
                          peak_gib=peak)))


def run_hf(args, folder, requests, tmp, batch):
    lines = tmp / "hf_requests.jsonl"
    lines.write_text("".join(json.dumps({"image": str(r["image"]), "text": r["text"], "length": r["length"]}) + "\n"
                             for r in requests))
    cmd = [sys.executable, __file__, "--hf-worker", "--model-dir", str(folder), "--hf-requests", str(lines),
           "--hf-batch", str(batch)] + (["--full-size"] if args.full_size else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"transformers worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rates(side, requests, sources):
    return dict(generated_tok_s=side["generated"] / side["seconds"],
                generated_tok_per_cpu_s=side["generated"] / side["cpu_seconds"], cpu_seconds=side["cpu_seconds"],
                prefill_tok_s=side["prompt_tokens"] / side["prefill_seconds"],
                images_s=sources / side["seconds"], seconds=side["seconds"], prefill_seconds=side["prefill_seconds"],
                decode_seconds=side["decode_seconds"], generated_tokens=side["generated"],
                prompt_tokens=side["prompt_tokens"], images_encoded=side["images_encoded"], peak_gib=side["peak_gib"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="exact 7B shapes, bf16, on CUDA")
    parser.add_argument("--images", type=int, default=None, help="stage-1 images (default 4 on CPU, 16 on CUDA)")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluation images (default 2 / 8)")
    parser.add_argument("--questions", type=int, default=None, help="questions per evaluation image (4 / 6)")
    parser.add_argument("--min-description", type=int, default=None, help="default 16 / 32")
    parser.add_argument("--max-description", type=int, default=None, help="default 192 / 512")
    parser.add_argument("--max-answer", type=int, default=12)
    parser.add_argument("--batch", type=int, default=None, help="stic's static batch and engine slots (8 / 32)")
    parser.add_argument("--engine-batch", type=int, default=None, help="engine slots (default: --batch)")
    parser.add_argument("--hf-batches", default=None, help="transformers batch sizes to try (4,8 / 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=None,
                        help="save the random model here, or reuse the one already there (bench-train shares it)")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hf-requests", help=argparse.SUPPRESS)
    parser.add_argument("--hf-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        return hf_worker(args)
    gpu = args.full_size
    if gpu and not torch.cuda.is_available():
        sys.exit("--full-size needs a CUDA GPU")
    defaults = dict(images=(16, 4), eval_images=(8, 2), questions=(6, 4), min_description=(32, 16),
                    max_description=(512, 192), batch=(32, 8), hf_batches=("16", "4,8"))
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    device, dtype = ("cuda", "bf16") if gpu else ("cpu", "f32")
    engine_batch = args.engine_batch or args.batch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.model_dir or tmp / "model")
        config = model_config(gpu)
        tiny_models.random_model_folder(config, folder, device, torch.bfloat16 if gpu else torch.float32, load=False)
        with torch.device("meta"):
            lm_params = sum(p.numel() for n, p in tiny_models.shapes_only(config).named_parameters()
                            if "language_model" in n)
        requests = workload(args, tmp)
        sources = len({r["source"] for r in requests})
        print(f"{len(requests)} requests ({sum(r['part'] == 'stage1' for r in requests)} stage 1, "
              f"{sum(r['part'] == 'eval' for r in requests)} evaluation), {sources} images, "
              f"{sum(r['length'] + 1 for r in requests)} new tokens; {lm_params / 1e6:.0f}M language-model parameters",
              flush=True)
        sides = {}
        sides["stic_static"] = run_stic(folder, requests, tmp, device, dtype, args.batch, static=True)
        print(f"stic static batches: {sides['stic_static']['seconds']:.1f} s", flush=True)
        sides["stic_engine"] = run_stic(folder, requests, tmp, device, dtype, engine_batch, static=False)
        print(f"stic engine: {sides['stic_engine']['seconds']:.1f} s", flush=True)
        hf = {}
        for b in [int(x) for x in args.hf_batches.split(",")]:
            hf[b] = run_hf(args, folder, requests, tmp, b)
            print(f"transformers batch {b}: {hf[b]['seconds']:.1f} s", flush=True)
        best = min(hf, key=lambda b: hf[b]["seconds"])
        sides["transformers"] = hf[best]
    expected = [t[:r["length"]] for t, r in zip(sides["stic_engine"]["tokens"], requests)]
    identical = {name: sum(t[:r["length"]] == e for t, r, e in zip(s["tokens"], requests, expected))
                 for name, s in sides.items()}
    results = {name: rates(s, requests, sources) for name, s in sides.items()}
    engine_stats = sides["stic_engine"]["engine"] or {}
    prompt_lengths = prompt_kinds(requests, sides["stic_engine"])
    result = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "language_model_parameters": lm_params,
        "workload": dict(requests=len(requests), images=sources, stage1_images=args.images,
                         eval_images=args.eval_images, questions_per_image=args.questions,
                         description_tokens=[args.min_description, args.max_description], answer_tokens=[1, args.max_answer],
                         new_tokens=sum(r["length"] + 1 for r in requests), seed=args.seed),
        "static_batch": args.batch, "engine_slots": engine_batch, "transformers_batch": best,
        "transformers_by_batch": {b: rates(h, requests, sources) for b, h in hf.items()},
        **results,
        "engine": engine_stats,
        "identical_rows": identical, "rows": len(requests),
        "engine_over_static": results["stic_engine"]["generated_tok_s"] / results["stic_static"]["generated_tok_s"],
        "engine_over_transformers": results["stic_engine"]["generated_tok_s"] / results["transformers"]["generated_tok_s"],
        # the same ratios on CPU time, firmer on a machine shared with other jobs
        "engine_over_static_cpu_time": results["stic_static"]["cpu_seconds"] / results["stic_engine"]["cpu_seconds"],
        "engine_over_transformers_cpu_time": results["transformers"]["cpu_seconds"] / results["stic_engine"]["cpu_seconds"],
        "reproduce_estimate": estimate_reproduce(results["stic_engine"], prompt_lengths, lm_params),
    }
    out = ROOT / "results" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("generate-full.json" if gpu else "generate.json")).write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}; {len(requests)} requests, {sources} images, static batch {args.batch}, engine slots "
          f"{engine_batch}, transformers best at batch {best}")
    memory = "GPU GiB" if gpu else "peak RSS GiB"
    print(f"{'':26}{'gen tok/s':>11}{'prefill tok/s':>15}{'images/s':>10}{'seconds':>9}{memory:>14}{'identical':>11}")
    for name, label in [("transformers", f"transformers (batch {best})"), ("stic_static", "stic static batches"),
                        ("stic_engine", "stic engine")]:
        r = results[name]
        print(f"{label:26}{r['generated_tok_s']:11.1f}{r['prefill_tok_s']:15.0f}{r['images_s']:10.3f}{r['seconds']:9.1f}"
              f"{r['peak_gib'] or float('nan'):14.2f}{identical[name]:>6}/{len(requests)}")
    print(f"engine_over_static = {result['engine_over_static']:.2f}, engine_over_transformers = "
          f"{result['engine_over_transformers']:.2f} (on CPU time: {result['engine_over_static_cpu_time']:.2f}, "
          f"{result['engine_over_transformers_cpu_time']:.2f}); engine: {engine_stats.get('prefill_tokens')} prompt tokens "
          f"computed, {engine_stats.get('reused_prefix_tokens')} shared from prefixes, "
          f"{sides['stic_engine']['images_encoded']} images encoded")
    e = result["reproduce_estimate"]
    print(f"make reproduce generation at these engine rates{' (scaled x%.0f to 7B)' % e['scale_to_7b'] if e['scale_to_7b'] > 1.5 else ''}: "
          f"{e['prompt_tokens'] / 1e6:.0f}M prompt + {e['new_tokens'] / 1e6:.1f}M new tokens = {e['hours']:.1f} h "
          f"(see estimate_reproduce for the assumptions)")


def prompt_kinds(requests, engine_side):
    """Mean prompt length per kind of request in this run (stic's counts, image tokens included), and the mean
    image tokens of a clean image (prompt length minus the text's tokens)."""
    tokenizer = tiny_models.tokenizer()
    by_kind = {}
    for r, n in zip(requests, engine_side["prompt_rows"]):
        by_kind.setdefault(r["kind"], []).append(n)
    mean = {k: sum(v) / len(v) for k, v in by_kind.items()}
    images = [n - (len(tokenizer(r["text"])["input_ids"]) - 1) for r, n in zip(requests, engine_side["prompt_rows"])
              if r["kind"] == "question"]
    return dict(image=sum(images) / len(images), preferred=mean["preferred"], description=mean["description"],
                question=mean["question"])


if __name__ == "__main__":
    main()
