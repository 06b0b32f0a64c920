"""LoRA + the STIC DPO objective against transformers + PEFT + the paper's formula, adapter interop both ways,
learning, resume and bad input."""
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file

import tiny_models
from conftest import DEVICE, IMAGES, run_stic, run_stic_json

PAIR_IMAGES = ["chelsea.png", "coffee.png", "logo.png", "camera.png"]
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def write_pairs(path, n=4, chosen="A cat sits on a red sofa near the window.", rejected="Two dogs run on a beach."):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "image": PAIR_IMAGES[i % len(PAIR_IMAGES)],
                "chosen": [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": chosen}],
                "rejected": [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": rejected}],
            }) + "\n")
    return path


def peft_adapter(model, out, seed=1):
    """A PEFT adapter with non-zero B (so every LoRA gradient is non-trivial) and a trained projector."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    peft = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
            elif "modules_to_save" in name:
                p.add_(0.01 * torch.randn_like(p))
    peft.save_pretrained(out)
    base = peft.unload()  # PEFT wraps the model in place; give back the plain model
    return out, base


def canonical(name):
    """Parameter names of stic's dump and of PEFT's model, reduced to one form."""
    name = name.replace(".default", "").replace("modules_to_save.", "")
    m = re.search(r"(layers\.\d+\..*lora_[AB])|(multi_modal_projector\..*)", name)
    return m.group(0).replace(".weight", "") + (".weight" if name.endswith(".weight") else ".bias")


def peft_model(model_dir, adapter_dir, dtype=torch.float32, is_trainable=False):
    """PEFT in the official recipe's regime: in a bf16 model the LoRA layers are bf16 too (DeepSpeed's bf16 engine
    casts the whole model and keeps the f32 master weights in the optimizer), so they compute in bf16."""
    base = tiny_models.LlavaNextForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable, autocast_adapter_dtype=False)


def reference_loss_and_grads(model_dir, adapter_dir, dump, images, beta=0.1, alpha=1 / 1024, dtype=torch.float32):
    model = peft_model(model_dir, adapter_dir, dtype, is_trainable=True)
    processor = tiny_models.processor()
    pix = processor.image_processor([Image.open(IMAGES / i) for i in images], return_tensors="pt")
    ids, mask, scored = dump["input_ids"], dump["attention_mask"], dump["scored"].bool()
    pairs = ids.shape[0] // 2
    pixel_values = torch.cat([pix["pixel_values"], pix["pixel_values"]]).to(dtype)
    image_sizes = torch.cat([pix["image_sizes"], pix["image_sizes"]])

    def logps(logits):
        lp = logits[:, :-1].float().log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
        return (lp * scored[:, 1:]).sum(1)

    with torch.no_grad(), model.disable_adapter():
        ref = logps(model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes).logits)
    pol = logps(model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes).logits)
    pc, pr, rc, rr = pol[:pairs], pol[pairs:], ref[:pairs], ref[pairs:]
    loss = (-F.logsigmoid(beta * ((pc - rc) - (pr - rr))) - alpha * pc).mean()
    loss.backward()
    grads = {canonical(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("checkpointing,dtype", [("true", "f32"), ("false", "f32"), ("true", "bf16")])
def test_loss_and_gradients_match_peft(hf_models, tmp_path, checkpointing, dtype):
    """In bf16 stic keeps LoRA and the trained projector as f32 master weights and computes both in bf16, as PEFT's
    bf16 layers do, so the loss agrees as closely as in f32 and the gradients to bf16's precision."""
    model, folder = hf_models["gqa"]
    adapter, _ = peft_adapter(tiny_models.build_model("gqa", seed=0), tmp_path / "adapter")
    data = write_pairs(tmp_path / "pairs.jsonl", n=2, rejected="Two dogs run on a beach under a grey sky, far away.")
    dump_path = tmp_path / "dump.safetensors"
    run_stic("train-dpo", "--model", folder, "--data", data, "--image-dir", IMAGES, "--output", tmp_path / "out",
             "--init-adapter", adapter, "--batch-size", "2", "--max-length", "4096", "--lora-dropout", "0", "--dtype", dtype, "--device", DEVICE,
             "--gradient-checkpointing", checkpointing, "--dump-first-step", dump_path)
    dump = load_file(dump_path)
    # the dump's rows are chosen then rejected for the pairs in file order: images 0, 1
    loss, grads = reference_loss_and_grads(folder, adapter, dump, PAIR_IMAGES[:2],
                                           dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    # stic on a GPU against the CPU reference: bf16 kernels round differently (measured 2e-4 on an H200)
    loss_tolerance = 1e-3 if dtype == "bf16" and DEVICE != "cpu" else 1e-5
    assert abs(dump["loss"].item() - loss) <= loss_tolerance * max(1.0, abs(loss)), (dump["loss"].item(), loss)
    stic_grads = {canonical(k[len("grad."):]): v for k, v in dump.items() if k.startswith("grad.")}
    assert set(stic_grads) == set(grads)
    for name, g in grads.items():
        g = g.float()
        rel = (stic_grads[name].float() - g).norm() / g.norm().clamp_min(1e-12)
        assert rel <= (1e-4 if dtype == "f32" else 2e-2), f"{name}: relative gradient error {rel:.2e}"


def score_logits(folder, image, tmp_path, adapter=None, name="x", processing="transformers", dtype="f32"):
    out = tmp_path / f"{name}.safetensors"
    extra = (["--adapter", adapter] if adapter else []) + ["--processing", processing]
    run_stic("score", "--model", folder, "--image", image, "--prompt", "What is shown?", "--response", "A cat.",
             "--logits-out", out, "--device", DEVICE, "--dtype", dtype, *extra)
    return load_file(out)


def peft_logits(folder, adapter, dump, dtype=torch.float32):
    return peft_logits_of(peft_model(folder, adapter, dtype), dump)


def peft_logits_of(model, dump):
    pix = tiny_models.processor().image_processor(Image.open(IMAGES / "chelsea.png"), return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=dump["input_ids"][None], pixel_values=pix["pixel_values"].to(model.dtype),
                     image_sizes=pix["image_sizes"]).logits[0].float()


def test_bf16_lora_logits_match_peft_in_bf16(hf_models, tmp_path):
    """A bf16 model runs LoRA in bf16 from its f32 weights, as PEFT's bf16 layers in the official recipe do."""
    _, folder = hf_models["gqa"]
    adapter, _ = peft_adapter(tiny_models.build_model("gqa", seed=0), tmp_path / "adapter")
    got = score_logits(folder, IMAGES / "chelsea.png", tmp_path, adapter=adapter, dtype="bf16")
    ref = peft_logits(folder, adapter, got, dtype=torch.bfloat16)
    # on the CPU the same bf16 operations give the same bits (measured max diff 0); on a GPU the kernels round
    # differently, so up to two bf16 steps at the logits' scale (|logit| < 1)
    tolerance = 0.0 if DEVICE == "cpu" else 1.6e-2
    assert (got["logits"].float() - ref).abs().max().item() <= tolerance
    # PEFT's default (adapter weights upcast to f32, x widened to f32) gives other logits: 0.0078 apart measured
    bf16_base = tiny_models.LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    widened = PeftModel.from_pretrained(bf16_base, adapter)
    assert (peft_logits_of(widened, got) - ref).abs().max().item() > tolerance


def test_stic_adapter_loads_in_peft(hf_models, tmp_path):
    _, folder = hf_models["gqa"]
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "trained"
    run_stic("train-dpo", "--model", folder, "--data", data, "--image-dir", IMAGES, "--output", out,
             "--max-steps", "3", "--lr", "1e-2", "--projector-lr", "1e-3", "--lora-r", "4", "--lora-alpha", "8",
             "--grad-accum", "1", "--max-length", "4096", "--dtype", "f32", "--device", DEVICE)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["modules_to_save"] == ["multi_modal_projector"]
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    got = score_logits(folder, IMAGES / "chelsea.png", tmp_path, adapter=out)
    plain = score_logits(folder, IMAGES / "chelsea.png", tmp_path, name="plain")
    assert (got["logits"] - plain["logits"]).abs().max() > 1e-3, "the adapter changed nothing"
    ref = peft_logits(folder, out, got)
    assert (got["logits"] - ref).abs().max().item() <= 1e-4

    merged = tmp_path / "merged"
    run_stic("merge", "--model", folder, "--adapter", out, "--output", merged)
    model = tiny_models.LlavaNextForConditionalGeneration.from_pretrained(merged).eval()
    pix = tiny_models.processor().image_processor(Image.open(IMAGES / "chelsea.png"), return_tensors="pt")
    with torch.no_grad():
        merged_logits = model(input_ids=got["input_ids"][None], pixel_values=pix["pixel_values"],
                              image_sizes=pix["image_sizes"]).logits[0]
    assert (got["logits"] - merged_logits).abs().max().item() <= 1e-4
    proc = run_stic("merge", "--model", folder, "--adapter", out, "--output", merged, check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr


@pytest.mark.parametrize("layout", ["llava_hf", "original_llava"])
def test_peft_adapter_loads_in_stic(hf_models, tmp_path, layout):
    _, folder = hf_models["mha"]
    adapter, _ = peft_adapter(tiny_models.build_model("mha", seed=2), tmp_path / "adapter")
    model_dir = folder
    if layout == "original_llava":  # the layout of STIC's released adapters: base_model.model.model.layers.*
        model_dir = tiny_models.to_original_layout(folder, tmp_path / "orig")
        tensors = load_file(adapter / "adapter_model.safetensors")
        renamed = {}
        for k, v in tensors.items():
            k = k.replace("base_model.model.model.language_model.", "base_model.model.model.")
            k = k.replace("base_model.model.language_model.model.", "base_model.model.model.")
            k = re.sub(r"multi_modal_projector\.linear_1", "model.mm_projector.0", k)
            k = re.sub(r"multi_modal_projector\.linear_2", "model.mm_projector.2", k)
            k = k.replace("base_model.model.model.model.mm_projector", "base_model.model.model.mm_projector")
            renamed[k] = v
        assert any(k.startswith("base_model.model.model.layers.") for k in renamed)
        from safetensors.torch import save_file
        save_file(renamed, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
        adapter_for_peft = tmp_path / "adapter_hf"
        shutil.copytree(tmp_path / "adapter", adapter_for_peft)
    got = score_logits(model_dir, IMAGES / "chelsea.png", tmp_path, adapter=adapter)
    if layout == "original_llava":
        # the same weights under llava-hf names give the PEFT reference
        peft_adapter(tiny_models.build_model("mha", seed=2), tmp_path / "adapter_ref")
        ref = peft_logits(folder, tmp_path / "adapter_ref", got)
    else:
        ref = peft_logits(folder, adapter, got)
    assert (got["logits"] - ref).abs().max().item() <= 1e-4


def train(folder, data, out, *extra, timeout=600):
    return run_stic("train-dpo", "--model", folder, "--data", data, "--image-dir", IMAGES, "--output", out,
                    "--lora-r", "4", "--lora-alpha", "8", "--grad-accum", "1", "--dtype", "f32", "--device", DEVICE,
                    *(extra if "--max-length" in extra else (*extra, "--max-length", "4096")), timeout=timeout)


def test_learning_drives_reward_accuracy_to_one(hf_models, tmp_path):
    _, folder = hf_models["gqa"]
    data = write_pairs(tmp_path / "pairs.jsonl", n=4, chosen="yes yes yes yes", rejected="no no no no")
    out = tmp_path / "out"
    train(folder, data, out, "--max-steps", "30", "--lr", "5e-3", "--projector-lr", "1e-3", "--batch-size", "2",
          "--beta", "0.5", "--lora-dropout", "0", timeout=1800)  # 60 anyres rows: minutes on 2 busy cores
    rows = list(__import__("csv").DictReader(open(out / "train_log.csv")))
    assert len(rows) == 30
    assert float(rows[-1]["rewards/accuracies"]) == 1.0
    assert float(rows[-1]["rewards/margins"]) > float(rows[0]["rewards/margins"]) + 1.0
    for col in ["loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm", "lr",
                "tokens_per_s"]:
        assert col in rows[0]
    [trained] = run_stic_json("generate", "--model", folder, "--adapter", out, "--image", IMAGES / "chelsea.png",
                              "--prompt", "Describe the image.", "--template", "vicuna_v1", "--max-new-tokens", "4",
                              "--json", "--device", DEVICE, "--dtype", "f32")
    assert trained["text"].split()[0] == "yes", trained["text"]


def test_resume_equals_an_uninterrupted_run(hf_models, tmp_path):
    _, folder = hf_models["gqa"]
    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    common = ["--max-steps", "10", "--lr", "1e-3", "--batch-size", "1", "--save-steps", "5", "--seed", "3"]
    train(folder, data, tmp_path / "straight", *common)
    train(folder, data, tmp_path / "resumed", *common, "--stop-after-steps", "5")
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    train(folder, data, tmp_path / "resumed", *common, "--resume")
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
    log = (tmp_path / "resumed" / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == [str(i) for i in range(1, 11)]


def test_bad_records(hf_models, tmp_path):
    _, folder = hf_models["gqa"]
    data = write_pairs(tmp_path / "pairs.jsonl", n=3)
    lines = data.read_text().splitlines()
    lines.insert(1, '{"image": "chelsea.png", "chosen": [')
    bad = {"image": "missing.png", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    empty = dict(bad, image="chelsea.png", rejected=[{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}])
    lines += [json.dumps(bad), json.dumps(empty)]
    data.write_text("\n".join(lines) + "\n")
    proc = run_stic("train-dpo", "--model", folder, "--data", data, "--image-dir", IMAGES, "--output", tmp_path / "o",
                    "--max-steps", "1", "--max-length", "4096", "--device", DEVICE, check=False)
    assert proc.returncode == 2 and "line 2" in proc.stderr and "--skip-bad" in proc.stderr, proc.stderr
    proc = train(folder, data, tmp_path / "o2", "--max-steps", "1", "--skip-bad")
    assert "line 2" in proc.stderr and "missing.png" in proc.stderr and "empty" in proc.stderr
    assert "3 preference pairs (3 skipped" in proc.stderr


def test_long_sequences_are_truncated_and_reported(hf_models, tmp_path):
    _, folder = hf_models["gqa"]
    data = write_pairs(tmp_path / "pairs.jsonl", n=2, chosen="word " * 1000)
    proc = train(folder, data, tmp_path / "o", "--max-steps", "1", "--max-length", "2200")
    assert "2 responses truncated to max_length 2200" in proc.stderr, proc.stderr
    proc = run_stic("train-dpo", "--model", folder, "--data", data, "--image-dir", IMAGES, "--output", tmp_path / "o2",
                    "--max-steps", "1", "--max-length", "100", "--device", DEVICE, check=False)
    assert proc.returncode == 2 and "over max_length 100" in proc.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(hf_models, tmp_path):
    _, folder = hf_models["gqa"]
    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    out = tmp_path / "o"
    proc = run_stic("train-dpo", "--model", folder, "--data", data, "--image-dir", IMAGES, "--output", out,
                    "--max-steps", "6", "--lr", "1e38", "--projector-lr", "1e38", "--save-steps", "1",
                    "--grad-accum", "1", "--lora-r", "4", "--max-length", "4096", "--device", DEVICE, "--dtype", "f32",
                    check=False)
    assert proc.returncode == 2, proc.stderr
    assert "non-finite" in proc.stderr and "last good checkpoint" in proc.stderr, proc.stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    tensors = load_file(out / "checkpoints" / latest / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs, so that a save can run out of space (needs root; skipped with the reason otherwise)."""
    import subprocess
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk, leave_bytes):
    import os
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def test_disk_full_when_saving_keeps_the_last_checkpoint(hf_models, tmp_path, small_disk):
    _, folder = hf_models["gqa"]
    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    out = small_disk / "run"
    common = ["--max-steps", "4", "--lr", "1e-3", "--save-steps", "1", "--seed", "5"]
    train(folder, data, out, *common, "--stop-after-steps", "1")
    good = (out / "checkpoints" / "latest").read_text().strip()
    before = load_file(out / "checkpoints" / good / "adapter_model.safetensors")
    fill(small_disk, leave_bytes=16 * 1024)
    proc = run_stic("train-dpo", "--model", folder, "--data", data, "--image-dir", IMAGES, "--output", out,
                    "--lora-r", "4", "--lora-alpha", "8", "--grad-accum", "1", "--dtype", "f32", "--device", DEVICE,
                    "--max-length", "4096", *common, "--resume", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "No space left" in proc.stderr or "space" in proc.stderr.lower(), proc.stderr
    assert "panicked" not in proc.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == good
    after = load_file(out / "checkpoints" / good / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_precomputed_reference_gives_the_same_training(hf_models, tmp_path):
    _, folder = hf_models["gqa"]
    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    common = ["--max-steps", "3", "--lr", "1e-3", "--lora-dropout", "0", "--seed", "4"]
    train(folder, data, tmp_path / "live", *common)
    train(folder, data, tmp_path / "cached", *common, "--precompute-reference")
    live = load_file(tmp_path / "live" / "adapter_model.safetensors")
    cached = load_file(tmp_path / "cached" / "adapter_model.safetensors")
    for k in live:
        assert (live[k] - cached[k]).abs().max().item() <= 1e-6, k
    rows = lambda d: (tmp_path / d / "train_log.csv").read_text().splitlines()[1:]  # noqa: E731
    assert [r.split(",")[1] for r in rows("live")] == [r.split(",")[1] for r in rows("cached")]
