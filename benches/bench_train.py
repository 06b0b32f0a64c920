"""`make bench-train`: the same STIC DPO steps (LoRA on every linear layer of the language model + the projector
trained in full, reference = the same weights with the adapter off, AdamW, warm-up + cosine, clipping) in
`stic train-dpo` and in a plain PyTorch + PEFT loop, on the same random model and the same token batch, measured in
one run on this machine. The table prints the ratios stic/PyTorch (below 1 is better for stic).

Each side runs in its own subprocess, one after the other, so that peak memory is comparable:
  * step time: stic's `train_log.csv` gives tokens/s for every optimizer step, timed by stic around the whole step
    (image load + preprocessing, reference forward, policy forward + backward, clipping, AdamW); step time =
    tokens / tokens_per_s. The PyTorch loop times the same span with time.perf_counter (its image is preprocessed
    once before the loop, so stic carries that small extra cost). The first `--warmup-steps` steps are left out;
    the table gives the median of the others (the JSON also has mean and min).
  * CPU s (CPU only): CPU seconds of all threads per step (stic: /proc/PID/stat between train_log.csv rows;
    PyTorch: time.process_time), median. Wall times are only meaningful on an otherwise idle machine; CPU time
    holds up much better when other processes share the cores (a warning is printed when the load says so).
  * tokens: the non-padding tokens of the micro-batch (chosen + rejected rows, image tokens included).
  * peak memory: CPU: the subprocess's maximum resident set size (os.wait4's ru_maxrss), model load and the
    runtime (Python + torch imports for PyTorch) included. CUDA: the process's device memory as nvidia-smi reports
    it, polled every 50 ms (allocator cache and CUDA context included, the same for both sides), plus
    torch.cuda.max_memory_allocated for PyTorch.
  * the batch: `stic train-dpo --dump-first-step` writes the exact input_ids / attention_mask / response mask of
    stic's first micro-batch; the PyTorch loop trains on those tensors, with the image through the transformers
    processor. The PyTorch side is the plain loop (one image per row, logits of every position);
    `--pytorch-logits response` makes it compute only the logits that are scored, as stic does. The first-step
    losses of both sides are printed as a check that they optimise the same thing (LoRA B starts at zero, so
    they agree to float precision; later steps differ by the dropout masks).

CPU (default): a ~150M-parameter model with the LLaVA-v1.6-Mistral-7B layer shapes scaled down (hidden 1024,
head_dim 128, 4:1 grouped-query attention, SwiGLU ratio 3.5, 4 decoder layers; CLIP-L/14 at 336 with anyres
tiles, 2 layers), LoRA r=16 / alpha 32 / dropout 0.05, 1 pair per step, grad_accum 1, f32, gradient
checkpointing on and off. About 5 minutes on 2 idle cores.
--full-size (CUDA only): random weights with the exact 7B shapes, LoRA r=128 / alpha 256, bf16, checkpointing on
(`--checkpointing both` adds off), a COCO-sized photo (2.3k tokens a row); adds model FLOPs utilisation:
    MFU = 8 * N * T / (step_time * peak_bf16_flops)
where N = language-model parameters without the input embedding (lm_head included), T = tokens in the step,
6*N*T = policy forward + backward, 2*N*T = reference forward (vision tower, attention scores and the checkpointing
recompute are not counted; with frozen base weights the backward needs no weight gradients and is nearer 2*N*T,
so the customary 6*N*T overstates the work done).
"""
import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

STIC = Path(os.environ.get("STIC_BIN", ROOT / "target" / "release" / "stic"))
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROMPT = "Describe the image in detail."
CHOSEN = ("The image shows a tabby cat with green eyes sitting upright on a wooden floor in a warmly lit room. "
          "Its fur is striped in shades of brown, grey and black, with a lighter patch on the chest, and its long "
          "whiskers stand out against the darker background. The cat looks directly at the camera with a calm, "
          "slightly curious expression, its ears pointed forward. Behind it the wall is plain and out of focus, "
          "which keeps the attention on the animal. The lighting comes from the left and casts a soft shadow on "
          "the right side of its face.")
REJECTED = ("The image shows two dogs playing fetch on a sandy beach at sunset. A large golden retriever is "
            "running towards the water with a red ball in its mouth while a small black terrier chases it. "
            "Several people are walking along the shore in the background, and a lighthouse stands on a rocky "
            "point to the right. The sky is orange and pink, and a few sailboats can be seen on the horizon. "
            "Seagulls fly above the waves, and footprints cover the wet sand near the water's edge.")
# dense bf16 peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "GH200": 989e12,
             "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A10G": 70e12, "L4": 121e12, "RTX 4090": 165e12}


def model_config(full_size, text_layers, vision_layers):
    import tiny_models
    if full_size:
        return tiny_models.benchmark_config(*tiny_models.FULL_SIZE)
    return tiny_models.benchmark_config(
        dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=text_layers, num_attention_heads=8,
             num_key_value_heads=2),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers, num_attention_heads=16))


def build_model_folder(args, folder):
    """Random weights saved in the llava-hf layout (or reused, see --model-dir); returns (total parameters, N for
    MFU)."""
    import torch
    import tiny_models
    config = model_config(args.full_size, args.text_layers, args.vision_layers)
    shapes = tiny_models.shapes_only(config)
    params = sum(p.numel() for p in shapes.parameters())
    lm = [(n, p) for n, p in shapes.named_parameters() if "language_model" in n or n.startswith("lm_head")]
    n_flops = sum(p.numel() for n, p in lm if "embed_tokens" not in n)
    device = "cuda" if args.full_size else "cpu"
    tiny_models.random_model_folder(config, folder, device, getattr(torch, args.dtype), load=False)
    if args.full_size:
        torch.cuda.empty_cache()
    return params, n_flops


def lossless_copy(image, work):
    """The image as PNG: JPEG decoders differ by a few grey levels (the image crate vs libjpeg-turbo), which a deep
    random model amplifies, and the first-step losses of both sides should agree."""
    from PIL import Image
    if image.suffix.lower() == ".png":
        return image
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    png = folder / (image.stem + ".png")
    Image.open(image).convert("RGB").save(png)
    return png


def write_pair(path, image):
    turn = lambda answer: [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer}]  # noqa: E731
    path.write_text(json.dumps({"image": image, "chosen": turn(CHOSEN), "rejected": turn(REJECTED)}) + "\n")
    return path


class GpuMemoryPoller:
    """Polls nvidia-smi every 50 ms for the device memory of one process and keeps the maximum. Where the process is
    not listed under its pid (a container's pid namespace), the rise of the GPU's total used memory stands in."""

    def __init__(self, pid):
        self.pid, self.peak_pid, self.peak_total, self.stop = str(pid), 0.0, 0.0, threading.Event()
        before = self.query(["--query-gpu=memory.used"])
        self.baseline = before[0][0] if before else 0.0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @staticmethod
    def query(what):
        try:
            out = subprocess.run(["nvidia-smi", *what, "--format=csv,noheader,nounits", "--id=0"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        rows = []
        for line in out.splitlines():
            try:
                rows.append([float(x) for x in line.split(",")])
            except ValueError:
                pass
        return rows

    def run(self):
        while not self.stop.is_set():
            for pid, mib in (r for r in self.query(["--query-compute-apps=pid,used_memory"]) if len(r) == 2):
                if str(int(pid)) == self.pid:
                    self.peak_pid = max(self.peak_pid, mib)
            for (mib,) in (r for r in self.query(["--query-gpu=memory.used"]) if len(r) == 1):
                self.peak_total = max(self.peak_total, mib - self.baseline)
            self.stop.wait(0.05)

    def finish(self):
        self.stop.set()
        self.thread.join()
        peak = self.peak_pid or self.peak_total
        return peak / 1024 if peak else None


class StepCpuWatcher:
    """CPU seconds (all threads) of a running stic process at each new row of its train_log.csv, so that per-step CPU
    time can be compared with the PyTorch loop's time.process_time() on a machine that other processes share."""

    def __init__(self, pid, log_csv):
        self.stat, self.csv, self.marks, self.stop = Path(f"/proc/{pid}/stat"), Path(log_csv), [], threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def cpu(self):
        fields = self.stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime

    def run(self):
        while not self.stop.is_set():
            try:
                cpu = self.cpu()
                rows = self.csv.read_text().count("\n") - 1 if self.csv.exists() else 0
            except (OSError, IndexError, ValueError):
                return
            self.marks.extend([cpu] * (rows - len(self.marks)))
            self.stop.wait(0.02)

    def finish(self):
        self.stop.set()
        self.thread.join()
        return [b - a for a, b in zip(self.marks, self.marks[1:])]  # steps 2.. (step 1's start is not seen)


def run_measured(cmd, cuda, log, step_log=None):
    """Runs cmd; returns (wall seconds, peak RSS GiB, peak GPU GiB or None, CPU seconds per step from step 2 or
    None). stdout/stderr go to `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT)
        poller = GpuMemoryPoller(proc.pid) if cuda else None
        watcher = StepCpuWatcher(proc.pid, step_log) if step_log else None
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    gpu = poller.finish() if poller else None
    cpu_steps = watcher.finish() if watcher else None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed ({proc.returncode}):\n"
                           + Path(log).read_text()[-4000:])
    return wall, usage.ru_maxrss / 2**20, gpu, cpu_steps  # ru_maxrss is in KiB on Linux


def stic_common(args, stic, folder, data, images, device, dtype):
    return [stic, "train-dpo", "--model", folder, "--data", data, "--image-dir", images,
            "--batch-size", "1", "--grad-accum", "1", "--lora-r", args.lora_r, "--lora-alpha", 2 * args.lora_r,
            "--lora-dropout", "0.05", "--max-length", "8192", "--device", device, "--dtype", dtype, "--seed", "0"]


def run_stic_train(args, stic, folder, data, images, out, device, dtype, checkpointing, tokens):
    cmd = stic_common(args, stic, folder, data, images, device, dtype) + [
        "--output", out, "--max-steps", args.steps, "--save-steps", 10**9,
        "--gradient-checkpointing", "true" if checkpointing else "false"]
    wall, rss, gpu, cpu_steps = run_measured(cmd, device == "cuda", Path(str(out) + ".log"),
                                             Path(out) / "train_log.csv" if device == "cpu" else None)
    rows = list(csv.DictReader(open(Path(out) / "train_log.csv")))
    step_s = [tokens / float(r["tokens_per_s"]) for r in rows]
    return dict(step_s=step_s, cpu_step_s=cpu_steps, wall_s=wall, peak_rss_gib=rss, peak_gpu_gib=gpu,
                loss=[float(r["loss"]) for r in rows])


def run_pytorch_train(args, folder, dump, image, workdir, device, dtype, checkpointing):
    spec = dict(folder=str(folder), dump=str(dump), image=str(image), device=device, dtype=dtype,
                checkpointing=checkpointing, steps=args.steps, lora_r=args.lora_r, logits=args.pytorch_logits,
                result=str(workdir / "pt.json"))
    spec_path = workdir / "pt-spec.json"
    spec_path.write_text(json.dumps(spec))
    wall, rss, gpu, _ = run_measured([sys.executable, __file__, "--worker", spec_path], device == "cuda",
                                  workdir / f"pytorch-{'ckpt' if checkpointing else 'nockpt'}.log")
    result = json.loads((workdir / "pt.json").read_text())
    return dict(result, wall_s=wall, peak_rss_gib=rss, peak_gpu_gib=gpu)


def pytorch_worker(spec_path):
    """The plain PyTorch + PEFT loop, run in its own process (the parent measures its memory)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from safetensors.torch import load_file
    import tiny_models
    from transformers import LlavaNextForConditionalGeneration, get_cosine_schedule_with_warmup

    spec = json.loads(Path(spec_path).read_text())
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    cuda = device == "cuda"
    if cuda:  # straight onto the GPU (accelerate)
        base = LlavaNextForConditionalGeneration.from_pretrained(spec["folder"], dtype=dtype, device_map=device)
    else:
        base = LlavaNextForConditionalGeneration.from_pretrained(spec["folder"], dtype=dtype)
    base.config.use_cache = False
    base.config.text_config.use_cache = False
    r = spec["lora_r"]
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=TARGETS,
                        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = get_peft_model(base, config)  # LoRA weights in f32 even on a bf16 model (autocast_adapter_dtype)
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    projector = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    steps = spec["steps"]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": 1e-7}, {"params": projector, "lr": 2e-5}],
                                  weight_decay=0.0, foreach=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.03 * steps + 0.999999), steps)

    dump = load_file(spec["dump"])
    ids, mask = dump["input_ids"].to(device), dump["attention_mask"].to(device)
    scored = dump["scored"].bool().to(device)
    pairs = ids.shape[0] // 2
    pix = tiny_models.processor().image_processor([Image.open(spec["image"])] * pairs, return_tensors="pt")
    pixel_values = torch.cat([pix["pixel_values"]] * 2).to(device, dtype)  # one image per row: chosen, rejected
    image_sizes = torch.cat([pix["image_sizes"]] * 2).to(device)
    beta, alpha = 0.1, 1 / 1024

    if spec["logits"] == "full":  # the plain way: logits of every position, full-vocabulary log-softmax
        keep, labels, weights = 0, ids[:, 1:], scored[:, 1:]
    else:  # only the positions that predict a response token of some row (transformers' logits_to_keep)
        keep = scored[:, 1:].any(0).nonzero().squeeze(1)
        labels, weights = ids[:, keep + 1], scored[:, keep + 1]

    def logps(logits):
        logits = logits[:, :-1] if spec["logits"] == "full" else logits
        lp = logits.float().log_softmax(-1).gather(2, labels[:, :, None]).squeeze(2)
        return (lp * weights).sum(1)

    def forward():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes,
                     logits_to_keep=keep).logits

    rss_before_steps = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # model load and setup, GiB
    step_s, cpu_step_s, losses = [], [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad(), model.disable_adapter():
            ref = logps(forward())
        pol = logps(forward())
        pc, pr, rc, rr = pol[:pairs], pol[pairs:], ref[:pairs], ref[pairs:]
        loss = (-F.logsigmoid(beta * ((pc - rc) - (pr - rr))) - alpha * pc).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + projector, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - start)
        cpu_step_s.append(time.process_time() - start_cpu)
    result = dict(step_s=step_s, cpu_step_s=cpu_step_s[1:], loss=losses, tokens=int(mask.sum()),
                  trainable=sum(p.numel() for p in lora + projector), peak_rss_before_steps_gib=rss_before_steps)
    if cuda:
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    Path(spec["result"]).write_text(json.dumps(result))


def copy_binary(dest, tries=10):
    """A private copy of the stic binary (its RUNPATH to libtorch is absolute), so that a rebuild during the run
    cannot swap it; retried while the binary is being relinked."""
    for attempt in range(tries):
        try:
            shutil.copy2(STIC, dest)
            subprocess.run([str(dest), "--version"], capture_output=True, check=True, timeout=60)
            return dest
        except (OSError, subprocess.SubprocessError):
            if attempt == tries - 1:
                raise
            time.sleep(10)


def summarise(run, tokens, warmup):
    timed = sorted(run["step_s"][warmup:])
    median = statistics.median(timed)
    out = dict(run, step_s_median=median, step_s_mean=statistics.fmean(timed), step_s_min=timed[0],
               tokens_per_s=tokens / median)
    cpu = run.get("cpu_step_s") and run["cpu_step_s"][max(warmup - 1, 0):]  # cpu_step_s starts at step 2
    if cpu:
        out["cpu_step_s_median"] = statistics.median(cpu)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="exact 7B shapes, r=128, bf16 (CUDA only)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4: 1 warm-up + 3 timed)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the means")
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default=None,
                        help="gradient checkpointing runs (default: both on CPU, on with --full-size)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default float32, bfloat16 with --full-size")
    parser.add_argument("--lora-r", type=int, default=None, help="default 16, 128 with --full-size")
    parser.add_argument("--text-layers", type=int, default=4, help="decoder layers of the CPU model")
    parser.add_argument("--vision-layers", type=int, default=2, help="CLIP layers of the CPU model")
    parser.add_argument("--image", default=None,
                        help="default data/images/chelsea.png (1.6k tokens a row); rocket.jpg, a COCO-sized photo "
                             "(2.3k tokens a row), with --full-size")
    parser.add_argument("--pytorch-logits", choices=["full", "response"], default="full",
                        help="PyTorch side: logits of every position (plain, default) or only of those that predict "
                             "response tokens (transformers' logits_to_keep; stic computes only those)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    parser.add_argument("--model-dir", default=None,
                        help="save the random model here, or reuse the one already there (bench-generate shares it)")
    parser.add_argument("--keep", default=None, help="keep the model, logs and outputs in this folder")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return pytorch_worker(args.worker)
    import torch
    if args.full_size and not torch.cuda.is_available():
        sys.exit("--full-size needs a CUDA GPU")
    if not STIC.exists():
        sys.exit(f"{STIC} is missing: run `make build` first")
    device = "cuda" if args.full_size else "cpu"
    dtype = args.dtype or ("bfloat16" if args.full_size else "float32")
    stic_dtype = {"bfloat16": "bf16", "float32": "f32"}[dtype]
    args.lora_r = args.lora_r or (128 if args.full_size else 16)
    args.dtype = dtype
    checkpointing = args.checkpointing or ("on" if args.full_size else "both")
    modes = {"both": [True, False], "on": [True], "off": [False]}[checkpointing]
    if args.steps <= args.warmup_steps:
        sys.exit("--steps must exceed --warmup-steps")
    started = time.perf_counter()

    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    work = Path(args.keep or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        # one binary for the whole run (the RUNPATH to libtorch is absolute), safe against a concurrent relink
        stic = copy_binary(work / "stic")
        default_image = "rocket.jpg" if args.full_size else "chelsea.png"
        image = lossless_copy(Path(args.image or ROOT / "data" / "images" / default_image).resolve(), work)
        model_dir = Path(args.model_dir) if args.model_dir else work / "model"
        params, n_flops = build_model_folder(args, model_dir)
        data = write_pair(work / "pair.jsonl", image.name)
        dump = work / "first-step.safetensors"
        run_measured(stic_common(args, stic, model_dir, data, image.parent, device, stic_dtype)
                     + ["--output", work / "dump-out", "--dump-first-step", dump], False, work / "dump.log")
        from safetensors.torch import load_file
        batch = load_file(dump)
        tokens = int(batch["attention_mask"].sum())
        response_tokens = int(batch["scored"].sum())
        runs = []
        for ckpt in modes:
            tag = "ckpt" if ckpt else "nockpt"
            print(f"[bench-train] stic, checkpointing {'on' if ckpt else 'off'} ...", file=sys.stderr, flush=True)
            s = run_stic_train(args, stic, model_dir, data, image.parent, work / f"stic-{tag}", device,
                               stic_dtype, ckpt, tokens)
            print(f"[bench-train] PyTorch + PEFT, checkpointing {'on' if ckpt else 'off'} ...", file=sys.stderr,
                  flush=True)
            p = run_pytorch_train(args, model_dir, dump, image, work, device, dtype, ckpt)
            assert p["tokens"] == tokens
            runs.append((ckpt, summarise(s, tokens, args.warmup_steps), summarise(p, tokens, args.warmup_steps)))
    finally:
        if tmp is not None:
            tmp.cleanup()

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak_flops = (args.peak_tflops * 1e12 if args.peak_tflops else
                  next((v for k, v in PEAK_BF16.items() if device == "cuda" and k in dev_name), None))
    load = os.getloadavg()[1]
    result = dict(device=dev_name, parameters=params, mfu_parameters=n_flops, dtype=dtype, lora_r=args.lora_r,
                  lora_alpha=2 * args.lora_r, lora_dropout=0.05, trainable_parameters=runs[0][2]["trainable"],
                  batch_rows=int(batch["input_ids"].shape[0]), sequence_length=int(batch["input_ids"].shape[1]),
                  tokens_per_step=tokens, response_tokens=response_tokens, steps=args.steps,
                  warmup_steps=args.warmup_steps, pytorch_logits=args.pytorch_logits, peak_bf16_flops=peak_flops,
                  load_average_5min=load, elapsed_s=time.perf_counter() - started,
                  step_time="stic: tokens / train_log.csv tokens_per_s; PyTorch: perf_counter around the step; "
                            "median (and mean, min) of the steps after the warm-up",
                  cpu_time="CPU seconds of all threads per step (stic: /proc/PID/stat between train_log.csv rows; "
                           "PyTorch: time.process_time), median; robust to other processes on the machine",
                  mfu_formula="8 * mfu_parameters * tokens_per_step / (step_s_median * peak_bf16_flops)", runs=[])
    print(f"model: {params / 1e6:.0f}M parameters ({n_flops / 1e6:.0f}M language model without embeddings), "
          f"{result['trainable_parameters'] / 1e6:.1f}M trained (LoRA r={args.lora_r} + projector), {dtype}, "
          f"{dev_name}")
    print(f"batch: 1 pair = 2 rows x {result['sequence_length']} tokens ({tokens} tokens, {response_tokens} scored); "
          f"{args.steps} steps, the first {args.warmup_steps} left out; PyTorch logits: {args.pytorch_logits}")
    mem = "peak_gpu_gib" if device == "cuda" else "peak_rss_gib"
    mem_label = "peak GPU GiB" if device == "cuda" else "peak RSS GiB"
    header = f"{'':26}{'step s':>8}{'(min)':>8}{'tokens/s':>10}{mem_label:>14}"
    header += f"{'loss@1':>10}" + (f"{'MFU':>7}" if peak_flops else f"{'CPU s':>8}")
    print(header)
    for ckpt, s, p in runs:
        entry = dict(gradient_checkpointing=ckpt, stic=s, pytorch=p,
                     step_time_ratio_stic_over_pytorch=s["step_s_median"] / p["step_s_median"],
                     min_step_time_ratio_stic_over_pytorch=s["step_s_min"] / p["step_s_min"],
                     tokens_per_s_ratio_stic_over_pytorch=s["tokens_per_s"] / p["tokens_per_s"],
                     first_loss_relative_difference=abs(s["loss"][0] - p["loss"][0]) / abs(p["loss"][0]))
        if s[mem] and p[mem]:
            entry["memory_ratio_stic_over_pytorch"] = s[mem] / p[mem]
        for name, r in (("stic", s), ("PyTorch + PEFT", p)):
            if peak_flops:
                r["mfu"] = 8 * n_flops * tokens / (r["step_s_median"] * peak_flops)
            line = (f"{name + (' (ckpt on)' if ckpt else ' (ckpt off)'):26}{r['step_s_median']:8.2f}"
                    f"{r['step_s_min']:8.2f}{r['tokens_per_s']:10.1f}{(r[mem] or float('nan')):14.2f}"
                    f"{r['loss'][0]:10.5f}")
            if peak_flops:
                line += f"{100 * r['mfu']:6.1f}%"
            elif r.get("cpu_step_s_median"):
                line += f"{r['cpu_step_s_median']:8.2f}"
            print(line)
        ratio = (f"  stic/PyTorch: step time {entry['step_time_ratio_stic_over_pytorch']:.2f}x "
                 f"(min {entry['min_step_time_ratio_stic_over_pytorch']:.2f}x), "
                 f"tokens/s {entry['tokens_per_s_ratio_stic_over_pytorch']:.2f}x")
        if s.get("cpu_step_s_median") and p.get("cpu_step_s_median"):
            entry["cpu_time_ratio_stic_over_pytorch"] = s["cpu_step_s_median"] / p["cpu_step_s_median"]
            ratio += f", CPU time {entry['cpu_time_ratio_stic_over_pytorch']:.2f}x"
        if "memory_ratio_stic_over_pytorch" in entry:
            ratio += f", peak memory {entry['memory_ratio_stic_over_pytorch']:.2f}x"
        if device == "cuda":
            ratio += f" (PyTorch max_memory_allocated {p['max_memory_allocated_gib']:.2f} GiB)"
        print(ratio)
        if entry["first_loss_relative_difference"] > 1e-3:
            print(f"  WARNING: the first-step losses differ ({s['loss'][0]} vs {p['loss'][0]}): not the same objective")
        result["runs"].append(entry)
    cores = os.cpu_count() or 1
    if device == "cpu" and load > cores + 0.5:
        print(f"WARNING: 5-minute load average {load:.1f} on {cores} CPUs: other processes shared the cores, so the "
              f"step times are noisy (the min column is the least disturbed)")
    out = ROOT / "results" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("train-full.json" if args.full_size else "train.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"written to {path.relative_to(ROOT)} ({result['elapsed_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
