"""`make bench-train`: the same STIC DPO steps (LoRA on every linear layer of the language model + the projector
trained in full, reference = the same weights with the adapter off, AdamW, warm-up + cosine, clipping) in
`stic train-dpo`, in TRL's `DPOTrainer` with PEFT (what users would pick) and in a plain PyTorch + PEFT loop, on the
same random model, pair and image, measured in one run on this machine. The table prints the ratios stic/TRL and
stic/PyTorch (below 1 is better for stic).

The shapes are the paper profile's scaled down: one pair per step of an anyres image prompt of ~2.3k tokens (a
COCO-sized photo, 640x427) and two responses of ~300 tokens; the loss is DPO's sigmoid loss (stic's alpha set to 0,
so that TRL's `sigmoid` loss is the same objective; TRL's `sft` term is a per-token mean, not alpha times the
summed log-probability, so it cannot be mapped exactly).

Every side runs in its own subprocess, one after the other, so that peak memory is comparable:
  * stic: `train-dpo` (the common prompt of chosen and rejected runs once per pass); `stic, each row alone` is the
    same with `--no-shared-prefix`, the rows packed but each computing its own prompt.
  * TRL: `DPOTrainer` (trl pinned in requirements-nodeps.txt) on a `datasets.Dataset` with prompt / chosen /
    rejected text and the PIL image, so the LLaVA-NeXT processor makes pixel_values and image_sizes itself; a PEFT
    model built as the PyTorch loop builds it and the same AdamW groups and schedule passed in; TRL's defaults
    otherwise, except what the model needs: no prompt or length truncation (TRL's defaults 512 / 1024 would cut
    the image) and `remove_unused_columns=False` (TRL's column filter drops `pixel_values` otherwise, see
    README), dropout kept (TRL disables it by default; every side runs LoRA dropout 0.05).
  * PyTorch + PEFT: the plain loop (one image per row, logits of every position) on the exact token batch that
    `stic train-dpo --dump-first-step` writes; `--pytorch-logits response` makes it compute only the scored logits.
  * step time: stic's `train_log.csv` gives tokens/s for every optimizer step (image load and preprocessing
    included), step time = tokens / tokens_per_s; TRL: time between the ends of consecutive steps (callbacks; the
    collation of the batch included); PyTorch: perf_counter around the step. The first `--warmup-steps` steps are
    left out; the table gives the median of the others (the JSON also has mean and min).
  * CPU s (CPU only): CPU seconds of all threads per step (stic: /proc/PID/stat between train_log.csv rows; TRL and
    PyTorch: time.process_time), median; firmer than wall time when other processes share the cores.
  * tokens: the tokens of the chosen and rejected rows (image tokens included) as each would run alone: the same
    number for every side (stic computes fewer: the prompt once).
  * peak memory: CPU: the subprocess's maximum resident set size (os.wait4's ru_maxrss), model load and runtime
    included. CUDA: the process's device memory as nvidia-smi reports it, polled every 50 ms.
  * first step: LoRA B starts at zero, so the policy is the reference and every side's first loss is ln 2 whatever
    it computes; the check that the sides compute the same thing is the first step's summed log-probabilities of
    the chosen and rejected response (stic's and TRL's logps/chosen, logps/rejected), which must agree to float
    precision (a warning says otherwise).

CPU (default): a ~150M-parameter model with the LLaVA-v1.6-Mistral-7B layer shapes scaled down (hidden 1024,
head_dim 128, 4:1 grouped-query attention, SwiGLU ratio 3.5, 4 decoder layers; CLIP-L/14 at 336 with anyres
tiles, 2 layers), LoRA r=16 / alpha 32 / dropout 0.05, f32, gradient checkpointing on (`--checkpointing both`
adds off).
--full-size (CUDA only): random weights with the exact 7B shapes, LoRA r=128 / alpha 256, bf16; adds model FLOPs
utilisation and a `stic train-sft` measurement (4 conversations of 2,048 tokens packed per micro-batch), from which
the stage-1 and stage-2 training times of `make reproduce` are estimated (6,275 pairs, 1 epoch; 5,000
conversations of at most 2,048 tokens, 1 epoch; one GPU):
    MFU = 8 * N * T / (step_time * peak_bf16_flops)
where N = language-model parameters without the input embedding (lm_head included), T = tokens in the step,
6*N*T = policy forward + backward, 2*N*T = reference forward (vision tower, attention scores and the checkpointing
recompute not counted). With T the rows' tokens MFU is comparable between the sides; stic runs the shared prompt
once, so `mfu_computed` (T = the tokens stic runs) is its hardware utilisation.
"""
import argparse
import csv
import json
import os
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
sys.path.insert(0, str(ROOT / "benches"))
from reproduce_workload import STAGE2_MAX_LENGTH, stage1_training_hours, stage2_training_hours  # noqa: E402

STIC = Path(os.environ.get("STIC_BIN", ROOT / "target" / "release" / "stic"))
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# stic's vicuna_v1 text (src/text/templates.rs): TRL gets the prompt as text, and its ids are checked against stic's
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
PROMPT = "Describe the image in detail."
# about 300 tokens each, as the paper profile's responses
CHOSEN = ("The image shows a rocket standing upright on its launch pad under a clear, pale blue sky. The vehicle is "
          "tall and slender, painted mostly white with black markings near the top, and a tall steel service tower "
          "rises right beside it, connected to the rocket by several access arms at different heights. Around the "
          "base of the pad there are low concrete structures, pipes and cable trays that carry fuel and power to "
          "the launch vehicle, and a few floodlights on thin poles stand at the corners of the site. The ground "
          "around the pad is flat and covered with short, dry grass and gravel, with a paved road curving away "
          "towards the left edge of the picture. In the far background a line of trees and a few low buildings "
          "can be seen on the horizon, softened by a light haze. A thin plume of white vapour drifts from the "
          "side of the rocket, which suggests that the tanks are being filled with cold propellant and that the "
          "launch is close. The light comes from the right and casts long shadows across the pad, so the photo "
          "was probably taken in the early morning or in the late afternoon. There are no people visible in the "
          "scene, which is typical for the final hours before a launch, when the area around the pad is cleared "
          "for safety. The composition places the rocket slightly right of the centre, and the vertical lines of "
          "the tower and the vehicle dominate the frame, giving a strong sense of height and of the scale of the "
          "machine compared with the flat landscape around it.")
REJECTED = ("The image shows a busy harbour at sunset with several fishing boats tied to a long wooden pier. The "
            "boats are painted in bright colours, red, yellow and green, and their nets are piled high on the "
            "decks next to stacks of plastic crates. A group of fishermen in orange overalls is unloading the "
            "catch of the day, passing boxes of silver fish from hand to hand towards a small truck parked at the "
            "end of the pier. Seagulls circle above the boats and a few of them sit on the wooden posts, waiting "
            "for scraps. On the right side of the picture there is a row of small white houses with blue shutters "
            "and a church with a tall bell tower, and behind them green hills rise towards a cloudy sky. The water "
            "in the harbour is calm and reflects the warm orange light of the sun, which is about to disappear "
            "behind a lighthouse on a rocky point at the entrance of the bay. Further out at sea a large ferry is "
            "heading towards the port, leaving a long white wake behind it. Children are playing on a small sandy "
            "beach to the left of the pier, building a sand castle near the water, while their parents sit on a "
            "bench and watch them. A dog runs along the shore chasing the waves. The scene is lively and peaceful "
            "at the same time, and it gives a clear picture of daily life in a small coastal town at the end of a "
            "long working day, when the boats come back from the sea.")
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


def write_pair(path, image, copies=1):
    """The pair as preference data, `copies` times (a global batch may not exceed the data)."""
    turn = lambda answer: [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer}]  # noqa: E731
    path.write_text((json.dumps({"image": image, "chosen": turn(CHOSEN), "rejected": turn(REJECTED)}) + "\n") * copies)
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
            "--lora-dropout", "0.05", "--alpha", "0", "--max-length", "8192", "--device", device, "--dtype", dtype,
            "--seed", "0"]


def stic_log_run(cmd, out, device, tokens):
    """Runs a stic training command; step times from its train_log.csv (tokens / tokens_per_s)."""
    wall, rss, gpu, cpu_steps = run_measured(cmd, device == "cuda", Path(str(out) + ".log"),
                                             Path(out) / "train_log.csv" if device == "cpu" else None)
    rows = list(csv.DictReader(open(Path(out) / "train_log.csv")))
    step_s = [tokens / float(r["tokens_per_s"]) for r in rows]
    return dict(step_s=step_s, cpu_step_s=cpu_steps, wall_s=wall, peak_rss_gib=rss, peak_gpu_gib=gpu,
                loss=[float(r["loss"]) for r in rows],
                logps=[[float(r["logps/chosen"]), float(r["logps/rejected"])] for r in rows])


def run_stic_train(args, stic, folder, data, images, out, device, dtype, checkpointing, tokens, shared=True):
    cmd = stic_common(args, stic, folder, data, images, device, dtype) + [
        "--output", out, "--max-steps", args.steps, "--save-steps", 10**9,
        "--gradient-checkpointing", "true" if checkpointing else "false"] + ([] if shared else ["--no-shared-prefix"])
    return stic_log_run(cmd, out, device, tokens)


def run_worker(kind, args, folder, dump, image, workdir, device, dtype, checkpointing):
    """The TRL or the plain PyTorch side in its own process (the parent measures its memory)."""
    tag = f"{kind}-{'ckpt' if checkpointing else 'nockpt'}"
    spec = dict(kind=kind, folder=str(folder), dump=str(dump), image=str(image), device=device, dtype=dtype,
                checkpointing=checkpointing, steps=args.steps, lora_r=args.lora_r, logits=args.pytorch_logits,
                result=str(workdir / f"{tag}.json"), workdir=str(workdir / tag))
    spec_path = workdir / f"{tag}-spec.json"
    spec_path.write_text(json.dumps(spec))
    wall, rss, gpu, _ = run_measured([sys.executable, __file__, "--worker", spec_path], device == "cuda",
                                     workdir / f"{tag}.log")
    result = json.loads((workdir / f"{tag}.json").read_text())
    return dict(result, wall_s=wall, peak_rss_gib=rss, peak_gpu_gib=gpu)


def peft_model(spec):
    """The model with LoRA (and the projector trained in full) as PEFT makes it, AdamW groups and the schedule."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaNextForConditionalGeneration, get_cosine_schedule_with_warmup

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    kwargs = dict(device_map=device) if device == "cuda" else {}  # straight onto the GPU (accelerate)
    base = LlavaNextForConditionalGeneration.from_pretrained(spec["folder"], dtype=dtype, **kwargs)
    base.config.use_cache = False
    base.config.text_config.use_cache = False
    r = spec["lora_r"]
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=TARGETS,
                        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = get_peft_model(base, config)  # LoRA weights in f32 even on a bf16 model (autocast_adapter_dtype)
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    projector = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": 1e-7}, {"params": projector, "lr": 2e-5}],
                                  weight_decay=0.0, foreach=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.03 * spec["steps"] + 0.999999), spec["steps"])
    return model, lora + projector, optimizer, scheduler


def pytorch_worker(spec):
    """The plain PyTorch + PEFT loop on stic's dumped batch."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import load_file
    import tiny_models

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    cuda = device == "cuda"
    model, trained, optimizer, scheduler = peft_model(spec)
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    dump = load_file(spec["dump"])
    ids, mask = dump["input_ids"].to(device), dump["attention_mask"].to(device)
    scored = dump["scored"].bool().to(device)
    pairs = ids.shape[0] // 2
    pix = tiny_models.processor().image_processor([Image.open(spec["image"])] * pairs, return_tensors="pt")
    pixel_values = torch.cat([pix["pixel_values"]] * 2).to(device, dtype)  # one image per row: chosen, rejected
    image_sizes = torch.cat([pix["image_sizes"]] * 2).to(device)
    beta = 0.1

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

    step_s, cpu_step_s, losses, policy_logps = [], [], [], []
    for _ in range(spec["steps"]):
        if cuda:
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad(), model.disable_adapter():
            ref = logps(forward())
        pol = logps(forward())
        pc, pr, rc, rr = pol[:pairs], pol[pairs:], ref[:pairs], ref[pairs:]
        loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        policy_logps.append([pc.mean().item(), pr.mean().item()])
        if cuda:
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - start)
        cpu_step_s.append(time.process_time() - start_cpu)
    result = dict(step_s=step_s, cpu_step_s=cpu_step_s[1:], loss=losses, logps=policy_logps, tokens=int(mask.sum()),
                  trainable=sum(p.numel() for p in trained))
    if cuda:
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(spec["result"]).write_text(json.dumps(result))


def trl_worker(spec):
    """TRL's DPOTrainer with PEFT: text and image in, the processor makes pixel_values and image_sizes."""
    import torch
    from datasets import Dataset
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = spec["device"] == "cuda"
    model, trained, optimizer, scheduler = peft_model(spec)
    processor = AutoProcessor.from_pretrained(spec["folder"])
    image = Image.open(spec["image"]).convert("RGB")
    # vicuna_v1 as stic renders it; TRL tokenizes prompt and response apart (no BOS for decoder-only models, an EOS
    # after each response), so the BOS is in the text and the responses start without a space
    prompt = f"<s>{SYSTEM} USER: <image>\n{PROMPT} ASSISTANT:"
    steps = spec["steps"]
    data = Dataset.from_dict({"images": [[image]] * steps, "prompt": [prompt] * steps,
                              "chosen": [CHOSEN] * steps, "rejected": [REJECTED] * steps})

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.cpu, self.logps = [], [], []

        def on_train_begin(self, *_, **__):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "logps/chosen" in logs:
                self.logps.append([logs["logps/chosen"], logs["logps/rejected"]])

    config = DPOConfig(
        output_dir=spec["workdir"], per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=steps,
        beta=0.1, loss_type="sigmoid", max_prompt_length=None, max_completion_length=None, max_length=None,
        remove_unused_columns=False, disable_dropout=False, gradient_checkpointing=spec["checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, bf16=spec["dtype"] == "bfloat16", use_cpu=not cuda,
        dataloader_num_workers=0)
    timer = Timer()
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=processor,
                         optimizers=(optimizer, scheduler), callbacks=[timer])
    row = trainer.train_dataset[0]
    # the same tokens as stic's first micro-batch
    dump = load_file(spec["dump"])
    ids, mask = dump["input_ids"], dump["attention_mask"].bool()
    stic_rows = [ids[i][mask[i]].tolist() for i in range(2)]
    trl_rows = [row["prompt_input_ids"] + row[k] for k in ("chosen_input_ids", "rejected_input_ids")]
    if trl_rows != stic_rows:
        raise SystemExit("TRL's token ids differ from stic's: the template text in bench_train.py must follow "
                         "src/text/templates.rs")
    losses, compute_loss = [], trainer.compute_loss

    def logged_compute_loss(*a, **k):  # the unrounded loss of each step (Trainer's log rounds it to 4 decimals)
        out = compute_loss(*a, **k)
        losses.append((out[0] if isinstance(out, tuple) else out).item())
        return out

    trainer.compute_loss = logged_compute_loss
    trainer.train()
    step_s = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    cpu_step_s = [b - a for a, b in zip(timer.cpu, timer.cpu[1:])]
    result = dict(step_s=step_s, cpu_step_s=cpu_step_s[1:], loss=losses, logps=timer.logps,
                  tokens=sum(len(r) for r in trl_rows), trainable=sum(p.numel() for p in trained))
    if cuda:
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(spec["result"]).write_text(json.dumps(result))


def write_sft_data(path, image, max_length):
    """4 conversations about `image`, each long enough to be cut at max_length (the stage-2 cap)."""
    words = (CHOSEN + " " + REJECTED).split()
    entries = [{"id": f"c{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + PROMPT},
        {"from": "gpt", "value": " ".join((words * (1 + max_length // len(words)))[: max_length - 100 * i])}]}
        for i in range(4)]
    path.write_text(json.dumps(entries))
    return path


def run_stic_sft(args, stic, folder, work, device, dtype):
    """Packed SFT micro-batches of 4 conversations cut at 2,048 tokens, with a photo whose prompt fits in them
    (data/images/chelsea.png, 1.5k tokens: the anyres prompt of the COCO-sized photo alone is over 2,048)."""
    data = write_sft_data(work / "sft.json", "chelsea.png", STAGE2_MAX_LENGTH)
    out = work / "stic-sft"
    cmd = [stic, "train-sft", "--model", folder, "--data", data, "--image-dir", ROOT / "data" / "images",
           "--output", out, "--batch-size", "4", "--grad-accum", "1", "--lora-r", args.lora_r,
           "--lora-alpha", 2 * args.lora_r, "--max-length", STAGE2_MAX_LENGTH, "--device", device, "--dtype", dtype,
           "--seed", "0", "--max-steps", args.steps, "--save-steps", 10**9, "--gradient-checkpointing", "true"]
    wall, rss, gpu, _ = run_measured(cmd, device == "cuda", Path(str(out) + ".log"))
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    tokens_per_s = [float(r["tokens_per_s"]) for r in rows][args.warmup_steps:]
    return dict(tokens_per_s_median=statistics.median(tokens_per_s), peak_rss_gib=rss, peak_gpu_gib=gpu,
                rows_per_step=4, max_length=STAGE2_MAX_LENGTH)


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


def shared_prefix(batch):
    """Tokens the chosen and rejected row of the dumped pair have in common at the start."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    chosen, rejected = ids[0][mask[0]].tolist(), ids[1][mask[1]].tolist()
    return next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))


SIDES = [("stic", "stic"), ("stic_unshared", "stic, each row alone"), ("trl", "TRL DPOTrainer + PEFT"),
         ("pytorch", "PyTorch + PEFT")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="exact 7B shapes, r=128, bf16 (CUDA only)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4: 1 warm-up + 3 timed)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the means")
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default="on",
                        help="gradient checkpointing runs (default on, as the shipped configs)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default float32, bfloat16 with --full-size")
    parser.add_argument("--lora-r", type=int, default=None, help="default 16, 128 with --full-size")
    parser.add_argument("--text-layers", type=int, default=4, help="decoder layers of the CPU model")
    parser.add_argument("--vision-layers", type=int, default=2, help="CLIP layers of the CPU model")
    parser.add_argument("--image", default=None,
                        help="default data/images/rocket.jpg, a COCO-sized photo (2.3k tokens a row)")
    parser.add_argument("--sides", default=",".join(k for k, _ in SIDES),
                        help="which sides to run, of " + ", ".join(k for k, _ in SIDES))
    parser.add_argument("--sft", action="store_true", help="also measure stic train-sft (always with --full-size)")
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
        spec = json.loads(Path(args.worker).read_text())
        return {"pytorch": pytorch_worker, "trl": trl_worker}[spec["kind"]](spec)
    import torch
    if args.full_size and not torch.cuda.is_available():
        sys.exit("--full-size needs a CUDA GPU")
    if not STIC.exists():
        sys.exit(f"{STIC} is missing: run `make build` first")
    sides = [s for s in args.sides.split(",") if s]
    if not sides or any(s not in dict(SIDES) for s in sides):
        sys.exit(f"--sides: choose from {', '.join(k for k, _ in SIDES)}")
    device = "cuda" if args.full_size else "cpu"
    dtype = args.dtype or ("bfloat16" if args.full_size else "float32")
    stic_dtype = {"bfloat16": "bf16", "float32": "f32"}[dtype]
    args.lora_r = args.lora_r or (128 if args.full_size else 16)
    args.dtype = dtype
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.checkpointing]
    if args.steps <= args.warmup_steps:
        sys.exit("--steps must exceed --warmup-steps")
    started = time.perf_counter()

    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    work = Path(args.keep or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    sft = None
    try:
        # one binary for the whole run (the RUNPATH to libtorch is absolute), safe against a concurrent relink
        stic = copy_binary(work / "stic")
        image = lossless_copy(Path(args.image or ROOT / "data" / "images" / "rocket.jpg").resolve(), work)
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
        prefix = shared_prefix(batch)
        runs = []
        for ckpt in modes:
            tag = "ckpt" if ckpt else "nockpt"
            measured = {}
            for side in sides:
                print(f"[bench-train] {dict(SIDES)[side]}, checkpointing {'on' if ckpt else 'off'} ...",
                      file=sys.stderr, flush=True)
                if side.startswith("stic"):
                    r = run_stic_train(args, stic, model_dir, data, image.parent, work / f"{side}-{tag}", device,
                                       stic_dtype, ckpt, tokens, shared=side == "stic")
                else:
                    r = run_worker(side, args, model_dir, dump, image, work, device, dtype, ckpt)
                    assert r["tokens"] == tokens, (side, r["tokens"], tokens)
                measured[side] = summarise(r, tokens, args.warmup_steps)
            runs.append((ckpt, measured))
        if args.sft or args.full_size:
            print("[bench-train] stic train-sft ...", file=sys.stderr, flush=True)
            sft = run_stic_sft(args, stic, model_dir, work, device, stic_dtype)
    finally:
        if tmp is not None:
            tmp.cleanup()

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak_flops = (args.peak_tflops * 1e12 if args.peak_tflops else
                  next((v for k, v in PEAK_BF16.items() if device == "cuda" and k in dev_name), None))
    load = os.getloadavg()[1]
    import trl
    result = dict(device=dev_name, parameters=params, mfu_parameters=n_flops, dtype=dtype, lora_r=args.lora_r,
                  lora_alpha=2 * args.lora_r, lora_dropout=0.05, trl_version=trl.__version__,
                  trainable_parameters=next((m["trainable"] for m in runs[0][1].values() if "trainable" in m), None),
                  batch_rows=int(batch["input_ids"].shape[0]), sequence_length=int(batch["input_ids"].shape[1]),
                  tokens_per_step=tokens, response_tokens=response_tokens, shared_prefix_tokens=prefix,
                  stic_computed_tokens_per_step=tokens - prefix, steps=args.steps, warmup_steps=args.warmup_steps,
                  loss="DPO sigmoid, beta 0.1 (stic --alpha 0, TRL loss_type sigmoid)",
                  pytorch_logits=args.pytorch_logits, peak_bf16_flops=peak_flops, load_average_5min=load,
                  elapsed_s=time.perf_counter() - started,
                  step_time="stic: tokens / train_log.csv tokens_per_s; TRL: between the ends of consecutive steps; "
                            "PyTorch: perf_counter around the step; median (and mean, min) of the steps after the "
                            "warm-up",
                  cpu_time="CPU seconds of all threads per step (stic: /proc/PID/stat between train_log.csv rows; "
                           "TRL and PyTorch: time.process_time), median",
                  mfu_formula="8 * mfu_parameters * tokens_per_step / (step_s_median * peak_bf16_flops)", runs=[])
    print(f"model: {params / 1e6:.0f}M parameters ({n_flops / 1e6:.0f}M language model without embeddings), "
          f"LoRA r={args.lora_r} + projector, {dtype}, {dev_name}; trl {trl.__version__}")
    print(f"batch: 1 pair = 2 rows, {tokens} tokens ({response_tokens} scored, {prefix} shared by both rows); "
          f"{args.steps} steps, the first {args.warmup_steps} left out; PyTorch logits: {args.pytorch_logits}")
    mem = "peak_gpu_gib" if device == "cuda" else "peak_rss_gib"
    mem_label = "peak GPU GiB" if device == "cuda" else "peak RSS GiB"
    header = f"{'':34}{'step s':>8}{'(min)':>8}{'tokens/s':>10}{mem_label:>14}"
    header += f"{'loss@1':>10}{'logps@1':>18}" + (f"{'MFU':>7}" if peak_flops else f"{'CPU s':>8}")
    print(header)
    for ckpt, measured in runs:
        entry = dict(gradient_checkpointing=ckpt, **measured)
        for side, r in measured.items():
            if peak_flops:
                r["mfu"] = 8 * n_flops * tokens / (r["step_s_median"] * peak_flops)
                if side == "stic":
                    r["mfu_computed"] = r["mfu"] * (tokens - prefix) / tokens
            line = (f"{dict(SIDES)[side] + (' (ckpt on)' if ckpt else ' (ckpt off)'):34}{r['step_s_median']:8.2f}"
                    f"{r['step_s_min']:8.2f}{r['tokens_per_s']:10.1f}{(r[mem] or float('nan')):14.2f}"
                    f"{r['loss'][0]:10.5f}{r['logps'][0][0]:9.2f}{r['logps'][0][1]:9.2f}")
            if peak_flops:
                line += f"{100 * r['mfu']:6.1f}%"
            elif r.get("cpu_step_s_median"):
                line += f"{r['cpu_step_s_median']:8.2f}"
            print(line)
            if "stic" in measured and side != "stic":
                s, key = measured["stic"], f"stic_over_{side}"
                ratios = dict(step_time=s["step_s_median"] / r["step_s_median"],
                              min_step_time=s["step_s_min"] / r["step_s_min"],
                              first_loss_relative_difference=abs(s["loss"][0] - r["loss"][0]) / abs(r["loss"][0]),
                              first_logps_relative_difference=max(
                                  abs(a - b) / abs(b) for a, b in zip(s["logps"][0], r["logps"][0])))
                if s.get("cpu_step_s_median") and r.get("cpu_step_s_median"):
                    ratios["cpu_time"] = s["cpu_step_s_median"] / r["cpu_step_s_median"]
                if s[mem] and r[mem]:
                    ratios["peak_memory"] = s[mem] / r[mem]
                entry[key] = ratios
                print(f"  stic / {dict(SIDES)[side]}: " + ", ".join(
                    f"{k.replace('_', ' ')} {v:.2f}x" for k, v in ratios.items() if not k.startswith("first_")))
                if ratios["first_loss_relative_difference"] > 1e-3 or ratios["first_logps_relative_difference"] > 1e-4:
                    print(f"  WARNING: the first step differs (loss {s['loss'][0]} vs {r['loss'][0]}, policy "
                          f"log-probs chosen/rejected {s['logps'][0]} vs {r['logps'][0]})")
        result["runs"].append(entry)
    # the headline ratios: the first run (checkpointing on by default)
    headline = result["runs"][0]
    for key in ("step_time", "peak_memory", "cpu_time"):
        if key in headline.get("stic_over_trl", {}):
            result[f"stic_over_trl_{key}"] = headline["stic_over_trl"][key]
    if sft:
        result["sft"] = sft
        print(f"stic train-sft: {sft['tokens_per_s_median']:.1f} tokens/s (4 conversations of {STAGE2_MAX_LENGTH} "
              f"tokens packed per micro-batch), {mem_label} {(sft[mem] or float('nan')):.2f}")
    if "stic" in headline:
        # make reproduce on one such device: stage 1 = one pair per micro-batch, stage 2 = rows of at most 2,048
        stage1_h = stage1_training_hours(headline["stic"]["step_s_median"])
        result["estimate_stage1_hours"] = stage1_h
        line = f"estimated make reproduce training time on this device: stage 1 {stage1_h:.2f} h"
        if sft:
            stage2_h = stage2_training_hours(sft["tokens_per_s_median"])
            result["estimate_stage2_hours_at_most"] = stage2_h
            line += f", stage 2 at most {stage2_h:.2f} h (every conversation {STAGE2_MAX_LENGTH} tokens)"
        print(line)
    cores = os.cpu_count() or 1
    if device == "cpu" and load > cores + 0.5:
        print(f"WARNING: 5-minute load average {load:.1f} on {cores} CPUs: other processes shared the cores, so the "
              f"step times are noisy (the min and CPU s columns are the least disturbed)")
    out = ROOT / "results" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("train-full.json" if args.full_size else "train.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"written to {path.relative_to(ROOT)} ({result['elapsed_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
