"""`make bench-ddp`: data-parallel scaling of `stic train-dpo` under torchrun, 1 rank against n ranks with the same
global batch.

Every run trains the same STIC DPO steps (LoRA on every linear layer of the language model + the projector, AdamW)
on the same random model with a global batch of G pairs per optimizer step: each rank takes micro-batches of one
pair and accumulates G / n of them, so the work per step is the same in every run and only its split over the
ranks differs (the first-step losses agree; LoRA dropout is off so that they agree exactly). With n > 1 the ranks
average their LoRA and projector gradients (gloo on CPU, NCCL on CUDA) before each update.

  step time       rank 0's time for a whole optimizer step (the all-reduce included): tokens of the global batch /
                  tokens_per_s of rank 0's train_log.csv; the median of the steps after the warm-up.
  throughput(n)   G / step time, in pairs per second, with n ranks.
  efficiency(n)   throughput(n) / (n * throughput(1)) = step_time(1) / (n * step_time(n)): 1.0 means n ranks are n
                  times as fast as one; the rest is the cost of the all-reduce and of waiting for the slowest rank.

CPU (default): gloo, 1 and 2 ranks, a small model (41M parameters; hidden 512, 2 decoder layers, 1 CLIP layer,
LoRA r 16), G = 2, 1 warm-up + 3 timed steps; a few minutes on 2 cores. Each rank gets `--threads-per-rank` intra-op
threads through OMP_NUM_THREADS (which libtorch honours; torchrun itself sets 1 for more than one process), by
default the cores divided by the largest rank count, in the 1-rank run too: like one GPU per rank, n ranks then
have n times the compute of one. Ranks on one CPU still share its memory bandwidth and caches (GPUs do not), and
gloo's all-reduce runs on the same cores. A further run gives one rank all the threads of the largest run, and the
table compares the ranks with it: whether data parallelism beats intra-op threading on the same cores.
CUDA (`--device cuda`): NCCL, one GPU per rank, 1, 2, 4, ... ranks up to the GPUs there (and their number), the
LLaVA-v1.6-Mistral-7B shapes with random weights in bf16, LoRA r 128, G = the least common multiple of the rank
counts.

Writes results/bench/ddp.json (results/bench/ddp-cuda.json with --device cuda).
"""
import argparse
import csv
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
sys.path.insert(0, str(ROOT / "benches"))

import tiny_models  # noqa: E402
from bench_train import STIC, copy_binary, write_pair  # noqa: E402

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
# (text config, vision config, LoRA r)
SHAPES = {
    "cpu": (dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=128),
            dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4), 16),
    "cuda": (*tiny_models.FULL_SIZE, 128),
}


def build_model(device, folder):
    """Random weights in the llava-hf layout (or the model already in `folder`); returns the parameter count."""
    import torch
    text, vision, _ = SHAPES[device]
    config = tiny_models.benchmark_config(text, vision)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tiny_models.random_model_folder(config, folder, device, dtype, load=False)
    if device == "cuda":
        torch.cuda.empty_cache()
    return sum(p.numel() for p in tiny_models.shapes_only(config).parameters())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(args, stic, folder, data, images, out):
    dtype = "bf16" if args.device == "cuda" else "f32"
    return [stic, "train-dpo", "--model", folder, "--data", data, "--image-dir", images, "--output", out,
            "--batch-size", 1, "--lora-r", args.lora_r, "--lora-alpha", 2 * args.lora_r, "--lora-dropout", 0,
            "--max-length", 8192, "--device", args.device, "--dtype", dtype, "--seed", 0,
            "--gradient-checkpointing", "true" if args.device == "cuda" else "false"]


def run_ranks(args, stic, folder, data, images, work, ranks, threads, tokens_per_step):
    """One torchrun launch of `ranks` processes; returns the step times and losses from rank 0's log."""
    out = work / f"ranks{ranks}-threads{threads}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", ranks, "--master-addr", "127.0.0.1",
           "--master-port", free_port(), "--no-python",
           *train_args(args, stic, folder, data, images, out),
           "--grad-accum", args.global_batch // ranks, "--max-steps", args.steps, "--save-steps", 10**9]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = str(threads)
    log = Path(str(out) + ".log")
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks} rank(s) failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    step_s = [tokens_per_step / float(r["tokens_per_s"]) for r in rows]
    timed = sorted(step_s[args.warmup_steps:])
    median = statistics.median(timed)
    return dict(ranks=ranks, threads_per_rank=threads, grad_accum=args.global_batch // ranks, step_s=step_s,
                step_s_median=median, step_s_min=timed[0], pairs_per_s=args.global_batch / median,
                loss=[float(r["loss"]) for r in rows], wall_s=wall)


def default_ranks(device):
    if device == "cpu":
        return [1, 2]
    import torch
    gpus = torch.cuda.device_count()
    return sorted({2**k for k in range(gpus.bit_length()) if 2**k <= gpus} | {gpus})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", default=None, help="rank counts to run, e.g. 1,2,4 (default: 1,2 on CPU; 1, 2, 4, "
                                                      "... up to the GPUs there)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="pairs per optimizer step (default: the least common multiple of the rank counts)")
    parser.add_argument("--threads-per-rank", type=int, default=None,
                        help="OMP_NUM_THREADS of every rank (default: the cores divided by the largest rank count)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4: 1 warm-up + 3 timed)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the median")
    parser.add_argument("--lora-r", type=int, default=None, help="default 16 on CPU, 128 on CUDA")
    parser.add_argument("--image", default=str(ROOT / "data" / "images" / "chelsea.png"))
    parser.add_argument("--model-dir", default=None, help="save the random model here, or reuse the one there")
    parser.add_argument("--keep", default=None, help="keep the model, logs and outputs in this folder")
    args = parser.parse_args()

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU")
    if not STIC.exists():
        sys.exit(f"{STIC} is missing: run `make build` first")
    ranks = sorted({int(r) for r in args.ranks.split(",")}) if args.ranks else default_ranks(args.device)
    if ranks[0] != 1:
        ranks.insert(0, 1)  # the baseline of the efficiency
    if args.device == "cuda" and ranks[-1] > torch.cuda.device_count():
        sys.exit(f"{ranks[-1]} ranks need as many GPUs; {torch.cuda.device_count()} are there")
    args.global_batch = args.global_batch or math.lcm(*ranks)
    if any(args.global_batch % n for n in ranks):
        sys.exit(f"--global-batch {args.global_batch} must be a multiple of every rank count {ranks}")
    if args.steps <= args.warmup_steps:
        sys.exit("--steps must exceed --warmup-steps")
    args.lora_r = args.lora_r or SHAPES[args.device][2]
    cores = os.cpu_count() or 1
    threads = args.threads_per_rank or max(1, cores // ranks[-1])
    started = time.perf_counter()

    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    work = Path(args.keep or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        stic = copy_binary(work / "stic")
        image = Path(args.image).resolve()
        folder = Path(args.model_dir) if args.model_dir else work / "model"
        print(f"[bench-ddp] building the random model in {folder} ...", file=sys.stderr, flush=True)
        params = build_model(args.device, folder)
        data = write_pair(work / "pair.jsonl", image.name, copies=args.global_batch)
        dump = work / "first-step.safetensors"
        subprocess.run([str(c) for c in train_args(args, stic, folder, data, image.parent, work / "dump-out")
                        + ["--dump-first-step", dump]], check=True, capture_output=True)
        from safetensors.torch import load_file
        tokens_per_pair = int(load_file(dump)["attention_mask"].sum())
        tokens_per_step = tokens_per_pair * args.global_batch
        runs = []
        for n in ranks:
            print(f"[bench-ddp] {n} rank(s) x {threads} thread(s) ...", file=sys.stderr, flush=True)
            runs.append(run_ranks(args, stic, folder, data, image.parent, work, n, threads, tokens_per_step))
        same_cores = None
        if args.device == "cpu" and ranks[-1] > 1:
            print(f"[bench-ddp] 1 rank x {threads * ranks[-1]} threads (the cores of the {ranks[-1]}-rank run) ...",
                  file=sys.stderr, flush=True)
            same_cores = run_ranks(args, stic, folder, data, image.parent, work, 1, threads * ranks[-1],
                                   tokens_per_step)
    finally:
        if tmp is not None:
            tmp.cleanup()

    base = runs[0]
    for r in runs:
        r["scaling_efficiency"] = r["pairs_per_s"] / (r["ranks"] * base["pairs_per_s"])
        r["speedup"] = r["pairs_per_s"] / base["pairs_per_s"]
    loss_spread = max(abs(r["loss"][0] - base["loss"][0]) for r in runs + ([same_cores] if same_cores else []))
    device = (torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {cores} cores")
    load = os.getloadavg()[1]
    result = dict(
        device=device, backend="nccl" if args.device == "cuda" else "gloo", parameters=params,
        lora_r=args.lora_r, global_batch_pairs=args.global_batch, micro_batch_pairs=1, tokens_per_pair=tokens_per_pair,
        steps=args.steps, warmup_steps=args.warmup_steps, threads_per_rank=threads, cores=cores,
        load_average_5min=load, first_step_loss_max_difference=loss_spread,
        step_time="global-batch tokens / tokens_per_s of rank 0's train_log.csv (the whole step, all-reduce "
                  "included); median of the steps after the warm-up",
        scaling_efficiency="throughput(n ranks) / (n * throughput(1 rank)), the same global batch and threads per "
                           "rank; 1.0 = perfect",
        runs=runs, elapsed_s=time.perf_counter() - started)
    print(f"model: {params / 1e6:.0f}M parameters, LoRA r={args.lora_r} + projector, {device}, "
          f"{result['backend']}")
    print(f"global batch: {args.global_batch} pair(s) of {tokens_per_pair} tokens per step (1 pair per micro-batch, "
          f"{args.global_batch} / ranks micro-batches per rank); {args.steps} steps, the first {args.warmup_steps} "
          f"left out")
    print(f"{'ranks':>6}{'threads/rank':>14}{'step s':>9}{'(min)':>8}{'pairs/s':>9}{'speed-up':>10}{'efficiency':>12}")
    for r in runs:
        print(f"{r['ranks']:6}{r['threads_per_rank']:14}{r['step_s_median']:9.2f}{r['step_s_min']:8.2f}"
              f"{r['pairs_per_s']:9.3f}{r['speedup']:9.2f}x{r['scaling_efficiency']:12.2f}")
    if same_cores:
        result["same_cores_one_rank"] = same_cores
        widest = runs[-1]
        result["ranks_over_threads"] = widest["pairs_per_s"] / same_cores["pairs_per_s"]
        print(f"{1:6}{same_cores['threads_per_rank']:14}{same_cores['step_s_median']:9.2f}"
              f"{same_cores['step_s_min']:8.2f}{same_cores['pairs_per_s']:9.3f}   (one rank, the cores of the "
              f"{widest['ranks']}-rank run: the ranks are {result['ranks_over_threads']:.2f}x its throughput)")
    if args.device == "cpu":
        used = threads * ranks[-1]
        share = ("share" if used >= cores else "use") + f" {used} of the {cores} cores"
        print(f"note: CPU ranks {share} ({threads} intra-op thread(s) each, OMP_NUM_THREADS); they also share the "
              f"memory bandwidth and caches, and gloo's all-reduce runs on the same cores")
        if used > cores:
            print(f"WARNING: {ranks[-1]} ranks x {threads} threads oversubscribe the {cores} cores")
        if load > cores + 0.5:
            print(f"WARNING: 5-minute load average {load:.1f} on {cores} cores: other processes shared them, so the "
                  f"times are noisy (the min column is the least disturbed)")
    if loss_spread > 1e-4:
        print(f"WARNING: the first-step losses differ by {loss_spread:.2e}: the runs did not train the same batch")
    out = ROOT / "results" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("ddp-cuda.json" if args.device == "cuda" else "ddp.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"written to {path.relative_to(ROOT)} ({result['elapsed_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
