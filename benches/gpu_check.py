"""The prepared device check (issue 21): what a short GPU lease must measure, in order of value, each step in its own
process under its own time limit, every result appended to one JSON file as the run goes (rewritten atomically after
each step, so that a killed run still reports). Needs only python3, torch and a prebuilt stic binary: run it through
benches/gpu_check.sh, which points the binary at this python's libtorch.

Steps: versions (library paths the binary resolves), dist (dist-check under torchrun: NCCL on GPUs, 2 gloo ranks on
the CPU), sdpa (which attention backend each of stic's call patterns gets, and what a new sequence length costs),
correctness (tiny model: greedy tokens and logits on the device against the CPU, CUDA graphs on and off, batch 1 and
8), generate (throughput on the bench-generate mix at 8/32/64 slots), train (DPO and SFT steps: step time, peak
memory), estimate (the `make reproduce` time extrapolated from the measured rates).

--dry-run: every step on the CPU with the tiny model and tiny shapes (make test runs it, so that the check cannot
rot); its JSON goes under results/gpu/ too, marked "dry_run": true.
"""
import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
from reproduce_workload import (LM_PARAMS_7B, estimate_reproduce, experiment_hours,  # noqa: E402
                                stage1_training_hours, stage2_training_hours)

IMAGES = ROOT / "data" / "images"
PROMPTS = json.loads((ROOT / "third_party" / "stic" / "prompts.json").read_text())
# seconds per step on a GPU (the sum stays under the 8-minute budget with room for start-up); the dry run's are
# the same limits, its steps take a fraction of them
STEPS = [("versions", 20), ("dist", 40), ("sdpa", 60), ("correctness", 60), ("generate", 160), ("train", 130),
         ("estimate", 10)]
TOTAL_BUDGET_S = 480
# the dry run runs in make test on CPUs that other jobs share: twice the limits, so that load alone cannot fail it
DRY_RUN_SLACK = 2
# the full-size runs: stic's hidden --random-weights builds the 7B geometry in memory on the GPU (no checkpoint;
# the shipped Mistral tokenizer), each run under its own limit (seconds) inside its step's
FULL_SIZE = "llava-v1.6-mistral-7b"
FULL_SIZE_LM_PARAMS = 7_241_994_240  # Mistral-7B with llava-hf's 32064-token vocabulary (src/model/geometry.rs)
FULL_SIZE_GENERATE_S, FULL_SIZE_TRAIN_S = 20, 30
# dense bf16 peak of the GPUs lent to this project (SXM), for the MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def run(cmd, timeout=None, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def write_json(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class GpuMemoryPoller:
    """The GPU's used memory (nvidia-smi, every 100 ms) while a process runs: its peak minus the baseline before
    (torch's allocator is not visible from outside the process). None without nvidia-smi."""

    def __init__(self):
        self.baseline, self.peak, self.stop = self.used(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        if self.baseline is not None:
            self.thread.start()

    @staticmethod
    def used():
        if not shutil.which("nvidia-smi"):
            return None
        try:
            out = run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"], 10)
            return float(out.stdout.split()[0])
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            return None

    def poll(self):
        while not self.stop.is_set():
            used = self.used()
            if used is not None:
                self.peak = max(self.peak, used - self.baseline)
            self.stop.wait(0.1)

    def finish(self):
        self.stop.set()
        if self.baseline is None:
            return None
        self.thread.join()
        return self.peak / 1024


def measured(cmd, log):
    """Runs cmd (output to log); returns (wall s, peak RSS GiB, peak GPU GiB or None). Raises on failure.
    ru_maxrss of a child starts from its parent's high-water mark at the fork: the train step's process does not
    import torch, so that stays small beside stic's."""
    poller = GpuMemoryPoller()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall, gpu = time.perf_counter() - start, poller.finish()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} failed:\n" + Path(log).read_text()[-3000:])
    return wall, usage.ru_maxrss / 2**20, gpu


def peak_flops():
    """The GPU's dense bf16 peak by its name, or None (unknown GPU, or the dry run)."""
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def mfu(flops_per_token_per_param, params, tokens, seconds):
    peak = peak_flops()
    return None if peak is None else flops_per_token_per_param * params * tokens / seconds / peak


def read_safetensors(path):
    """{name: torch tensor} of a safetensors file, without the safetensors package (not on the device machine)."""
    import torch
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        raw = bytearray(data[8 + n + a: 8 + n + b])
        out[name] = torch.frombuffer(raw, dtype=dtypes[meta["dtype"]]).reshape(meta["shape"]) if raw else \
            torch.empty(meta["shape"], dtype=dtypes[meta["dtype"]])
    return out


def lm_parameters(model_dir):
    """Language-model parameters of a model folder, from its safetensors headers."""
    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__" and ("language_model" in name or name.startswith("lm_head")):
                count = 1
                for d in meta["shape"]:
                    count *= d
                total += count
    return total


class Context:
    def __init__(self, args, work):
        self.args, self.work, self.stic = args, Path(work), Path(args.stic).resolve()
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.model = self.work / "tiny-model"
        self.step_out = Path(args.step_out) if args.step_out else None

    def partial(self, measurements):
        """What a step has measured so far: the parent keeps it if the step runs out of time."""
        if self.step_out:
            write_json(self.step_out, dict(status="partial", measurements=measurements))

    def tiny_model(self):
        if not (self.model / "config.json").exists():
            out = run([self.stic, "init-tiny", "--output", self.model, "--seed", "0"], 60)
            if out.returncode != 0:
                raise RuntimeError("init-tiny failed: " + out.stderr[-2000:])
        return self.model

    def full_size(self):
        """The flags of the full-size model: the 7B geometry, the dry run's tiny one (the same code path)."""
        return ["--random-weights", "tiny" if self.dry else FULL_SIZE]

    def generate(self, requests, tag, *extra, device=None, dtype="f32", model=None, timeout=None):
        """stic generate on JSON-lines requests (`model`: its flags, default the tiny folder): (rows, stats)."""
        lines = self.work / f"{tag}.jsonl"
        lines.write_text("".join(json.dumps(r) + "\n" for r in requests))
        stats = self.work / f"{tag}-stats.json"
        out = run([self.stic, "generate", *(model or ["--model", self.tiny_model()]), "--requests", lines, "--json",
                   "--device", device or self.device, "--dtype", dtype, "--stats-out", stats, *extra], timeout)
        if out.returncode != 0:
            raise RuntimeError(f"generate {tag} failed: " + out.stderr[-2000:])
        return [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")], json.loads(stats.read_text())


# ---------------------------------------------------------------------------------------------------------- steps

def step_versions(ctx):
    import torch
    m = dict(python=sys.version.split()[0], torch=torch.__version__, torch_cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             cuda_available=torch.cuda.is_available(), host=platform.node(), machine=platform.machine(),
             libc=" ".join(platform.libc_ver()),
             ld_library_path=os.environ.get("LD_LIBRARY_PATH"), stic=str(ctx.stic))
    if torch.cuda.is_available():
        m["gpus"] = [dict(name=torch.cuda.get_device_name(i),
                          memory_gib=torch.cuda.get_device_properties(i).total_memory / 2**30,
                          capability=list(torch.cuda.get_device_capability(i)))
                     for i in range(torch.cuda.device_count())]
        nccl = torch.cuda.nccl.version()
        m["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    m["stic_version"] = run([ctx.stic, "--version"], 20).stdout.strip()
    ldd = run(["ldd", ctx.stic], 20).stdout
    m["ldd"] = {line.split("=>")[0].strip(): line.split("=>")[1].split("(")[0].strip()
                for line in ldd.splitlines() if "=>" in line}
    m["ldd_not_found"] = [name for name, path in m["ldd"].items() if path == "not found"]
    if shutil.which("nvidia-smi"):
        m["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                               "--format=csv,noheader"], 20).stdout.strip().splitlines()
    if m["ldd_not_found"]:
        raise RuntimeError(f"the binary cannot resolve {m['ldd_not_found']}")
    return m


def step_dist(ctx):
    import torch
    gpus = 0 if ctx.dry else torch.cuda.device_count()
    nproc, device = (gpus, "cuda") if gpus else (2, "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    start = time.perf_counter()
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc, "--master-addr",
               "127.0.0.1", "--master-port", port, "--no-python", ctx.stic, "dist-check", "--device", device],
              env=env)
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    m = dict(nproc=nproc, device=device, seconds_with_launch=time.perf_counter() - start, ranks=lines,
             backends=sorted({x.get("backend") for x in lines}))
    ok = (out.returncode == 0 and sorted(x["rank"] for x in lines) == list(range(nproc))
          and all(x["sum"] == nproc * (nproc - 1) / 2 and x["broadcast"] == 7 for x in lines))
    if not ok:
        m["stderr"] = out.stderr[-3000:]
        raise StepFailed(m)
    return m


def step_sdpa(ctx):
    """Each backend forced in turn (sdpa_kernel) on each of stic's call patterns: which succeed, their steady time
    and the first call's; the default choice's kernels (profiler); the first call at a new sequence length."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = ctx.device
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    # 7B: 32 heads, 8 key/value heads, head_dim 128; CLIP-L: 16 heads of 64. The dry run: tiny shapes.
    h, kv, d, clip_h, clip_d = (4, 2, 16, 4, 16) if ctx.dry else (32, 8, 128, 16, 64)
    cache, prefill, rows = (64, 48, 4) if ctx.dry else (4096, 2900, 32)
    segments = [(40, None), (12, 0), (10, 0)] if ctx.dry else [(2200, None), (320, 0), (310, 0)]
    tiles = (5, 577 if not ctx.dry else 65)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=grad)

    def decode(length):
        q, k, v = rnd(rows, h, 1, d), rnd(rows, kv, length, d), rnd(rows, kv, length, d)
        mask = torch.ones(rows, 1, 1, length, dtype=torch.bool, device=dev)
        for r in range(rows):  # rows of a padded cache hold different lengths
            mask[r, ..., length - (r * 37) % (length // 2) - 1:] = False
            mask[r, ..., -1] = True
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def causal(length):
        q, k, v = rnd(1, h, length, d), rnd(1, kv, length, d), rnd(1, kv, length, d)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def packed():
        """What SegmentedAttention (src/model/attention.rs) runs for a packed DPO pair, forward + backward: the
        prompt causal over itself, each response over the prompt's keys and its own with a boolean mask."""
        n = sum(s for s, _ in segments)
        q, k, v = rnd(1, h, n, d, grad=True), rnd(1, kv, n, d, grad=True), rnd(1, kv, n, d, grad=True)
        starts = [sum(s for s, _ in segments[:i]) for i in range(len(segments))]
        calls = []
        for i, (length, parent) in enumerate(segments):
            keys = [(starts[parent], segments[parent][0])] if parent is not None else []
            keys.append((starts[i], length))
            offset = sum(x for _, x in keys) - length
            mask = None if parent is None else \
                torch.ones(length, offset + length, dtype=torch.bool, device=dev).tril(offset)[None, None]
            calls.append((starts[i], length, keys, mask))

        def run():
            outs = []
            for start, length, keys, mask in calls:
                kk = torch.cat([k.narrow(2, s0, n0) for s0, n0 in keys], 2)
                vv = torch.cat([v.narrow(2, s0, n0) for s0, n0 in keys], 2)
                outs.append(F.scaled_dot_product_attention(q.narrow(2, start, length), kk, vv, attn_mask=mask,
                                                           is_causal=mask is None, enable_gqa=True))
            torch.cat(outs, 2).sum().backward()
        return run

    def response_segment():
        """One masked response call of the packed pair alone, forward + backward (the pattern that needs a mask)."""
        (prompt, _), (length, _) = segments[0], segments[1]
        q, k, v = rnd(1, h, length, d, grad=True), rnd(1, kv, prompt + length, d, grad=True), \
            rnd(1, kv, prompt + length, d, grad=True)
        mask = torch.ones(length, prompt + length, dtype=torch.bool, device=dev).tril(prompt)[None, None]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()

    def clip():
        q, k, v = (rnd(tiles[0], clip_h, tiles[1], clip_d) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v)

    patterns = {f"decode_masked_gqa_{rows}x{cache}": lambda: decode(cache),
                f"prefill_causal_gqa_{prefill}": lambda: causal(prefill),
                f"packed_pair_segments_fwd_bwd_{'+'.join(str(n) for n, _ in segments)}": packed,
                f"response_segment_masked_fwd_bwd_{segments[1][0]}x{segments[0][0] + segments[1][0]}":
                    response_segment,
                f"clip_tiles_{tiles[0]}x{tiles[1]}": clip}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(fn, repeats=5):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return dict(first_ms=1e3 * first, steady_ms=1e3 * statistics.median(times))

    def default_kernels(fn):
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            fn()
            sync()
        words = ("flash", "fmha", "cudnn", "efficient", "attention", "softmax", "bmm", "gemm", "mem_eff")
        names = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in words)}
        return sorted(names)[:12]

    result = {}
    for name, make in patterns.items():
        fn = make()
        entry = {}
        for label, backend in backends.items():
            # torch says why it refuses a backend in warnings: keep them
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([backend]):
                        entry[label] = dict(ok=True, **timed(fn))
                except Exception as e:  # noqa: BLE001 - a backend that refuses the pattern is the finding
                    entry[label] = dict(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            if caught:
                entry[label]["warnings"] = sorted({str(w.message)[:300] for w in caught})[:4]
        try:
            entry["default"] = dict(ok=True, **timed(fn), kernels=default_kernels(fn))
        except Exception as e:  # noqa: BLE001
            entry["default"] = dict(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        result[name] = entry
        ctx.partial(dict(patterns=result))
        del fn
        if dev == "cuda":
            torch.cuda.empty_cache()
    # what a sequence length not seen before costs: the first call at length+1 against the steady time
    new_length = {}
    for label, make in [("decode", decode), ("prefill", causal)]:
        base = cache if label == "decode" else prefill
        entry = {}
        # a different new length for each backend, so that none finds the plan another one built
        for i, backend in enumerate(("default", "cudnn", "flash", "efficient")):
            try:
                ctxm = sdpa_kernel([backends[backend]]) if backend != "default" else contextlib.nullcontext()
                with ctxm:
                    t0 = timed(make(base))
                    t1 = timed(make(base + 1 + i), repeats=1)
                entry[backend] = dict(ok=True, steady_ms=t0["steady_ms"], new_length=base + 1 + i,
                                      new_length_first_ms=t1["first_ms"], new_length_second_ms=t1["steady_ms"])
            except Exception as e:  # noqa: BLE001
                entry[backend] = dict(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        new_length[label] = entry
    return dict(dtype=str(dtype), device=dev, heads=h, kv_heads=kv, head_dim=d, patterns=result,
                new_sequence_length=new_length)


def correctness_requests(dry):
    """8 requests over 4 images (the dry run: 4 over 2, fewer tokens)."""
    images = ["chelsea.png", "logo.png"] if dry else ["chelsea.png", "logo.png", "astronaut.png", "coffee.png"]
    prompts = ["Describe the image in detail.", "What is in the picture?"]
    return [dict(image=str(IMAGES / images[i % len(images)]), prompt=prompts[i // len(images)],
                 max_new_tokens=8 if dry else 16) for i in range(2 * len(images))]


def step_correctness(ctx):
    """Greedy tokens (f32) of the tiny model on the device against the CPU, batch 8 and 1, CUDA graphs on and
    off; the logits of one scored response (stic score) on both, max absolute difference."""
    requests = correctness_requests(ctx.dry)
    ref_rows, _ = ctx.generate(requests, "ref-cpu", "--batch-size", "8", device="cpu")
    reference = [r["tokens"] for r in ref_rows]
    runs = {}
    variants = [(8, True), (1, True)] + ([] if ctx.dry else [(8, False), (1, False)])
    for batch, graphs in variants:
        tag = f"batch{batch}-graphs-{'on' if graphs else 'off'}"
        rows, stats = ctx.generate(requests, tag, "--batch-size", str(batch),
                                   *([] if graphs else ["--no-cuda-graphs"]))
        tokens = [r["tokens"] for r in rows]
        differing = [i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b]
        runs[tag] = dict(tokens_equal=not differing and len(tokens) == len(reference), differing_rows=differing,
                         first_difference=[next((j for j, (x, y) in enumerate(zip(tokens[i], reference[i])) if x != y),
                                                None) for i in differing],
                         graph_steps=(stats.get("engine") or {}).get("graph_steps"),
                         decode_steps=(stats.get("engine") or {}).get("decode_steps"))
        ctx.partial(dict(runs=runs))
    logits = {}
    for dev in ["cpu", ctx.device]:
        f = ctx.work / f"logits-{dev}.safetensors"
        out = run([ctx.stic, "score", "--model", ctx.tiny_model(), "--image", IMAGES / "chelsea.png", "--prompt",
                   "Describe the image.", "--response", "A cat sits on a red sofa.", "--device", dev, "--dtype", "f32",
                   "--logits-out", f], 120)
        if out.returncode != 0:
            raise RuntimeError("score failed: " + out.stderr[-2000:])
        logits[dev] = read_safetensors(f)["logits"]
    diff = (logits["cpu"] - logits[ctx.device]).abs().max().item()
    m = dict(device=ctx.device, dtype="f32", requests=len(requests), reference="cpu, batch 8", runs=runs,
             logits_max_abs_diff=diff, logits_tolerance=1e-3, logits_max_abs=logits["cpu"].abs().max().item())
    if diff > 1e-3 or not all(r["tokens_equal"] for r in runs.values()):
        raise StepFailed(m)
    return m


def generate_workload(dry, seed=0):
    """The bench-generate mix (stage-1 preferred + hallucination/description prompts on the same image, evaluation
    descriptions + short questions), with varied lengths forced by max_new_tokens and --ignore-eos. Raw text in
    the mistral_instruct form, as bench_generate.py sends it."""
    rng = random.Random(seed)
    stage1, evals, questions, (lo, hi), answer = (2, 1, 2, (8, 16), 4) if dry else (48, 16, 6, (32, 256), 12)
    pictures = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    raw = lambda text: f"[INST] <image>\n{text} [/INST]"  # noqa: E731
    requests = []
    for i in range(stage1):
        image = str(pictures[i % len(pictures)])
        second = rng.choice(PROMPTS["hallucination_prompts" if i % 2 == 0 else "description_prompts"])
        for text, kind in [(PROMPTS["preferred_prompt"], "preferred"), (second, "stage1_second")]:
            requests.append(dict(image=image, text=raw(text), max_new_tokens=rng.randint(lo, hi) + 1, kind=kind))
    for i in range(evals):
        image = str(pictures[(stage1 + i) % len(pictures)])
        requests.append(dict(image=image, text=raw(PROMPTS["dar_description_prompt"]),
                             max_new_tokens=rng.randint(lo, hi) + 1, kind="description"))
        for q in range(questions):
            requests.append(dict(image=image, text=raw(f"Question {q}: what is in the image? Answer briefly."),
                                 max_new_tokens=rng.randint(1, answer) + 1, kind="question"))
    return requests


def step_generate(ctx):
    requests = generate_workload(ctx.dry)
    kinds = [r.pop("kind") for r in requests]
    runs = {}
    for slots in (8, 32, 64):
        for graphs in ([True] if ctx.dry else [True, False]):
            tag = f"slots{slots}-graphs-{'on' if graphs else 'off'}"
            rows, s = ctx.generate(requests, tag, "--batch-size", str(slots), "--ignore-eos", "--warmup",
                                   *([] if graphs else ["--no-cuda-graphs"]),
                                   dtype="f32" if ctx.dry else "bf16")
            engine = s.get("engine") or {}
            runs[tag] = dict(slots=slots, cuda_graphs=graphs, seconds=s["seconds"],
                             generated_tok_s=s["generated_tokens"] / s["seconds"],
                             prefill_tok_s=s["prompt_tokens"] / (s["prepare_seconds"] + s["prefill_seconds"]),
                             prompt_tokens=s["prompt_tokens"], generated_tokens=s["generated_tokens"],
                             graph_steps=engine.get("graph_steps"), decode_steps=engine.get("decode_steps"),
                             cache_capacity=engine.get("cache_capacity"),
                             peak_gib=s["gpu_memory_gib"] if ctx.device == "cuda" else s["peak_rss_gib"])
            ctx.partial(dict(runs=runs))
            prompt_rows = [r["prompt_tokens"] for r in rows]
    by_kind = {}
    for kind, n in zip(kinds, prompt_rows):
        by_kind.setdefault(kind, []).append(n)
    mean = {k: sum(v) / len(v) for k, v in by_kind.items()}
    # a question's image tokens: its prompt less the text's tokens (`<image>` is one placeholder id there)
    question = next(r for r, k in zip(requests, kinds) if k == "question")
    ids = run([ctx.stic, "tokenize", "--model", ctx.tiny_model()], 60, input=json.dumps(question["text"]) + "\n")
    image_tokens = prompt_rows[kinds.index("question")] - (len(json.loads(ids.stdout)) - 1)
    lengths = dict(image=image_tokens, preferred=mean["preferred"], description=mean["description"],
                   question=mean["question"])
    return dict(model="tiny (stic init-tiny)", lm_parameters=lm_parameters(ctx.tiny_model()),
                dtype="f32" if ctx.dry else "bf16", requests=len(requests), runs=runs, prompt_lengths=lengths,
                full_size_7b=generate_full_size(ctx, requests, dict(runs=runs)))


def full_size_params(ctx):
    return lm_parameters(ctx.tiny_model()) if ctx.dry else FULL_SIZE_LM_PARAMS


def generate_full_size(ctx, requests, measured_so_far):
    """The 7B geometry (--random-weights, bf16; the dry run: tiny, f32) at 8 / 32 / 64 slots and auto (its
    cache_slots: the rows the GPU's memory holds), graphs on, on the first 64 requests of the mix at most 32 new
    tokens each, each run under its own limit: generated tokens/s, peak memory, MFU (2 x parameters x generated and prompt tokens / time / the GPU's peak)."""
    requests = [dict(r, max_new_tokens=min(r["max_new_tokens"], 32)) for r in requests[:64]]
    params, dtype = full_size_params(ctx), "f32" if ctx.dry else "bf16"
    result = dict(model=" ".join(ctx.full_size()), lm_parameters=params, dtype=dtype, runs={})
    for slots in (8, 32, 64, "auto"):
        tag = f"full-size-slots{slots}"
        try:
            _, s = ctx.generate(requests, tag, "--batch-size", str(slots), "--ignore-eos", "--warmup", dtype=dtype,
                                model=ctx.full_size(), timeout=FULL_SIZE_GENERATE_S * (DRY_RUN_SLACK if ctx.dry else 1))
        except subprocess.TimeoutExpired:
            result["runs"][tag] = dict(slots=slots, status="timeout", limit_s=FULL_SIZE_GENERATE_S)
            continue
        except RuntimeError as e:
            result["runs"][tag] = dict(slots=slots, status="failed", error=str(e)[-1000:])
            continue
        tokens = s["generated_tokens"] + s["prompt_tokens"]
        result["runs"][tag] = dict(slots=slots, status="ok", seconds=s["seconds"],
                                   cache_slots=(s.get("engine") or {}).get("cache_slots"),
                                   generated_tok_s=s["generated_tokens"] / s["seconds"],
                                   prompt_tokens=s["prompt_tokens"], generated_tokens=s["generated_tokens"],
                                   peak_gib=s["gpu_memory_gib"] if ctx.device == "cuda" else s["peak_rss_gib"],
                                   mfu=mfu(2, params, tokens, s["seconds"]))
        ctx.partial(dict(measured_so_far, full_size_7b=result))
    return result


def step_train(ctx):
    """A few DPO and SFT optimizer steps of the tiny model: step time (train_summary.json seconds / steps, the
    first step's start-up included), tokens/s of the last step, peak memory (RSS; GPU: nvidia-smi's used memory
    over the baseline)."""
    model = ctx.tiny_model()
    turn = lambda a: [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": a}]  # noqa
    pairs = ctx.work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(dict(image=im, chosen=turn("A cat sits on a red sofa near the window."),
                                             rejected=turn("Two dogs run on a beach."))) + "\n"
                             for im in ["chelsea.png", "logo.png"]))
    sft = ctx.work / "sft.json"
    sft.write_text(json.dumps([dict(id=str(i), image="logo.png", conversations=[
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "A small logo on a plain background. " * (4 if ctx.dry else 40)}]) for i in range(4)]))
    steps = 2 if ctx.dry else 5
    dtype = "f32" if ctx.dry else "bf16"
    result = dict(model="tiny (stic init-tiny)", dtype=dtype, steps=steps)
    for kind, data, batch in [("dpo", pairs, 1), ("sft", sft, 1 if ctx.dry else 2)]:
        out = ctx.work / f"train-{kind}"
        cmd = [ctx.stic, f"train-{kind}", "--model", model, "--data", data, "--image-dir", IMAGES, "--output", out,
               "--max-steps", steps, "--batch-size", batch, "--grad-accum", "1", "--lora-r", "8", "--lora-alpha", "16",
               "--save-steps", "100000", "--report-to", "none", "--device", ctx.device, "--dtype", dtype]
        wall, rss, gpu = measured(cmd, ctx.work / f"train-{kind}.log")
        summary = json.loads((out / "train_summary.json").read_text())
        last = summary["final"]["tokens_per_s"]
        result[kind] = dict(batch_size=batch, wall_s=wall, train_seconds=summary["seconds"],
                            step_s_mean=summary["seconds"] / summary["steps"],
                            tokens_per_step=summary["train_tokens"] / summary["steps"],
                            tokens_per_s_last_step=last, peak_rss_gib=rss, peak_gpu_gib=gpu)
        ctx.partial(result)
    result["full_size_7b"] = full_size_train = dict(model=" ".join(ctx.full_size()), dtype=dtype,
                                                    lm_parameters=full_size_params(ctx))
    for kind, data, stage in [("dpo", pairs, "stage1"), ("sft", sft, "stage2")]:
        full_size_train[kind] = train_full_size(ctx, kind, data, stage, dtype)
        ctx.partial(result)
    return result


def train_full_size(ctx, kind, data, stage, dtype):
    """2 optimizer steps of the full-size geometry at the paper profile's shapes (configs/paper/STAGE.yaml: LoRA
    r 128, its batch size and max_length, gradient checkpointing; one micro-batch a step) under its own limit:
    step time, tokens/s, peak memory, MFU (6 x parameters x tokens / time / the GPU's peak; LoRA's backward skips
    the frozen weights' gradients, so this counts what a full fine-tune would do)."""
    out = ctx.work / f"train-{kind}-full-size"
    limit = FULL_SIZE_TRAIN_S * (DRY_RUN_SLACK if ctx.dry else 1)
    cmd = ["timeout", limit, ctx.stic, f"train-{kind}", *ctx.full_size(), "--config",
           ROOT / "configs" / "paper" / f"{stage}.yaml", "--data", data, "--image-dir", IMAGES, "--output", out,
           "--max-steps", 2, "--grad-accum", 1, "--save-steps", "100000", "--report-to", "none",
           "--device", ctx.device, "--dtype", dtype]
    try:
        wall, rss, gpu = measured(cmd, ctx.work / f"train-{kind}-full-size.log")
    except RuntimeError as e:
        return dict(status="failed or timeout", limit_s=limit, error=str(e)[-1000:])
    summary = json.loads((out / "train_summary.json").read_text())
    step_s = summary["seconds"] / summary["steps"]
    tokens_per_step = summary["train_tokens"] / summary["steps"]
    return dict(status="ok", wall_s=wall, step_s_mean=step_s, tokens_per_step=tokens_per_step,
                tokens_per_s_last_step=summary["final"]["tokens_per_s"], peak_rss_gib=rss, peak_gpu_gib=gpu,
                mfu=mfu(6, full_size_params(ctx), tokens_per_step, step_s))


def step_estimate(ctx, results):
    """`make reproduce` on one device, extrapolated: generation from the generate step's best engine rates (the
    estimate of bench_generate.py), stage 1 from the DPO step time per pair, stage 2 from the SFT tokens/s, each
    scaled linearly by parameter count to 7B when the measured model is smaller."""
    steps = {s["name"]: s for s in results["steps"]}
    gen, train = steps.get("generate", {}), steps.get("train", {})
    if gen.get("status") != "ok" or train.get("status") != "ok":
        raise StepFailed(dict(reason="needs the generate and train steps"))
    g, t = gen["measurements"], train["measurements"]
    best = max(g["runs"].values(), key=lambda r: r["generated_tok_s"])
    generation = estimate_reproduce(best, g["prompt_lengths"], g["lm_parameters"])
    scale = LM_PARAMS_7B / g["lm_parameters"]
    stage1_h = scale * stage1_training_hours(t["dpo"]["step_s_mean"])
    stage2_h = scale * stage2_training_hours(t["sft"]["tokens_per_s_last_step"])
    return dict(hours=generation["hours"] + stage1_h + stage2_h, generation_hours=generation["hours"],
                stage1_training_hours=stage1_h, stage2_training_hours_at_most=stage2_h, scale_to_7b=scale,
                experiments=experiment_hours(generation["part_hours"], stage1_h, stage2_h),
                generation=generation, from_run=f"slots {best['slots']}, graphs {best['cuda_graphs']}",
                basis="EXTRAPOLATION, not a measurement: rates of the model measured here ("
                      f"{g['lm_parameters'] / 1e6:.1f}M language-model parameters) multiplied by {scale:.0f} to "
                      "7.11B; a tiny model is bound by overheads, not by its FLOPs, so the figure is only as good "
                      "as that scaling (meaningful once the 7B steps run)")


class Stopped(Exception):
    """SIGTERM (gpu_check.sh's overall limit, or the lease ending): the running step is recorded as timed out."""


def stop(*_):
    raise Stopped


class StepFailed(Exception):
    def __init__(self, measurements):
        super().__init__("step failed")
        self.measurements = measurements


STEP_FUNCTIONS = dict(versions=step_versions, dist=step_dist, sdpa=step_sdpa, correctness=step_correctness,
                      generate=step_generate, train=step_train)


def child(args):
    """One step in this process: writes {status, measurements} (or the error) to --step-out."""
    ctx = Context(args, args.work)
    out = Path(args.step_out)
    try:
        if args.step == "estimate":
            m = step_estimate(ctx, json.loads(Path(args.results).read_text()))
        else:
            m = STEP_FUNCTIONS[args.step](ctx)
        write_json(out, dict(status="ok", measurements=m))
    except StepFailed as e:
        write_json(out, dict(status="failed", measurements=e.measurements))
    except Exception as e:  # noqa: BLE001 - every failure is a result to report
        write_json(out, dict(status="failed", error=f"{type(e).__name__}: {e}"[-4000:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stic", nargs="?", default=str(ROOT / "target" / "release" / "stic"), help="the stic binary")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny shapes")
    parser.add_argument("--out", default=None, help="the JSON file (default results/gpu/gpu_check-DATE-HOST.json)")
    parser.add_argument("--steps", default=",".join(n for n, _ in STEPS), help="which steps, comma-separated")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"seconds for all steps together (default {TOTAL_BUDGET_S}, twice that with --dry-run)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--step-out", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        return child(args)
    slack = DRY_RUN_SLACK if args.dry_run else 1
    args.budget = args.budget or TOTAL_BUDGET_S * slack
    if not Path(args.stic).is_file():
        sys.exit(f"{args.stic}: no stic binary (build it with `make build`, or pass its path)")
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible to torch: run with --dry-run for the CPU check")
    now = datetime.now(timezone.utc)
    host = platform.node().split(".")[0] or "host"
    out = Path(args.out or ROOT / "results" / "gpu" /
               f"gpu_check-{now:%Y%m%dT%H%M%SZ}-{host}{'-dry-run' if args.dry_run else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in args.steps.split(",") if s]
    unknown = [s for s in chosen if s not in dict(STEPS)]
    if unknown:
        sys.exit(f"--steps: unknown {unknown}; choose from {', '.join(n for n, _ in STEPS)}")
    results = dict(check="benches/gpu_check.py", started_utc=now.isoformat(timespec="seconds"), host=host,
                   dry_run=args.dry_run, stic=str(Path(args.stic).resolve()), budget_s=args.budget,
                   finished=False, steps=[])
    write_json(out, results)
    started, stopped = time.perf_counter(), False
    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        for name, limit in STEPS:
            left = args.budget - (time.perf_counter() - started)
            entry = dict(name=name, status="skipped", seconds=0.0, limit_s=min(limit * slack, max(0, int(left))))
            if name not in chosen:
                entry["reason"] = "not in --steps"
            elif left < 10:
                entry["reason"] = "the total budget is spent"
            else:
                step_out = Path(work) / f"{name}.result.json"
                cmd = [sys.executable, __file__, args.stic, "--step", name, "--step-out", step_out, "--work", work,
                       "--results", out] + (["--dry-run"] if args.dry_run else [])
                t, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                print(f"== {name} (limit {entry['limit_s']} s)", flush=True)
                # its own session, so that a timeout ends the step's stic and torchrun processes too
                proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
                try:
                    log = proc.communicate(timeout=entry["limit_s"])[0]
                    got = json.loads(step_out.read_text()) if step_out.exists() else {}
                    if got.get("status") not in ("ok", "failed"):  # died before its result (a crash)
                        got = dict(status="failed", measurements=got.get("measurements"),
                                   error=f"exit {proc.returncode}: {log[-3000:]}")
                except (subprocess.TimeoutExpired, Stopped) as e:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
                    stopped = isinstance(e, Stopped)
                    got = dict(status="timeout", error="the whole check was stopped (SIGTERM)" if stopped
                               else f"killed after {entry['limit_s']} s")
                    if step_out.exists():  # what the step measured before
                        got["measurements"] = json.loads(step_out.read_text()).get("measurements")
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                entry.update(got, seconds=round(time.perf_counter() - t, 2), cpu_seconds=round(
                    after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, 2))
                print(f"{name}: {entry['status']} in {entry['seconds']} s"
                      + (f" ({entry['error'][:300]})" if "error" in entry else ""), flush=True)
            results["steps"].append(entry)
            write_json(out, results)
            if stopped:
                print(f"stopped; written to {out}")
                return 124
    results.update(finished=True, seconds=round(time.perf_counter() - started, 2))
    write_json(out, results)
    print(f"written to {out}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in results["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
