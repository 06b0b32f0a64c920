"""Shared-prefix DPO and padding-free micro-batches: against the unshared computation and against transformers +
PEFT on the same rows right-padded; a global batch larger than the data takes each example once."""
import json

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file

import tiny_models
from conftest import DEVICE, IMAGES, run_stic
from test_dpo import canonical, peft_adapter, reference_loss_and_grads

TURN = lambda prompt, answer: [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]  # noqa: E731
# (image, chosen, rejected): the same prompt (the prefix ends where the responses part); prompts that differ (only
# the system text is shared, the image runs in both rows); identical rows (the prefix is the whole chosen row)
EDGE_PAIRS = [
    ("chelsea.png", TURN("Describe the image.", "A cat sits on a red sofa."), TURN("Describe the image.", "Two dogs.")),
    ("coffee.png", TURN("What is on the table?", "A cup of coffee."), TURN("Describe the image.", "A red car.")),
    ("logo.png", TURN("Describe the image.", "A logo."), TURN("Describe the image.", "A logo.")),
    ("camera.png", TURN("Describe the image.", "A man holds a camera."), TURN("Describe the image.", "A man.")),
]


def write_edge_pairs(path):
    path.write_text("".join(json.dumps({"image": i, "chosen": c, "rejected": r}) + "\n" for i, c, r in EDGE_PAIRS))
    return path


def train_dpo(folder, data, out, *extra):
    return run_stic("train-dpo", "--model", folder, "--data", data, "--image-dir", IMAGES, "--output", out,
                    "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--grad-accum", "1",
                    "--max-length", "4096", "--dtype", "f32", "--device", DEVICE, "--seed", "7", *extra)


def test_edge_pairs_match_peft(hf_models, tmp_path):
    """Loss and gradients of one micro-batch holding all three kinds of pair, against PEFT on the padded rows."""
    _, folder = hf_models["gqa"]
    adapter, _ = peft_adapter(tiny_models.build_model("gqa", seed=0), tmp_path / "adapter")
    dump_path = tmp_path / "dump.safetensors"
    train_dpo(folder, write_edge_pairs(tmp_path / "pairs.jsonl"), tmp_path / "out", "--init-adapter", adapter,
              "--batch-size", "3", "--gradient-checkpointing", "true", "--dump-first-step", dump_path)
    dump = load_file(dump_path)
    loss, grads = reference_loss_and_grads(folder, adapter, dump, [p[0] for p in EDGE_PAIRS[:3]])
    assert abs(dump["loss"].item() - loss) <= 1e-5 * max(1.0, abs(loss)), (dump["loss"].item(), loss)
    stic_grads = {canonical(k[len("grad."):]): v for k, v in dump.items() if k.startswith("grad.")}
    assert set(stic_grads) == set(grads)
    for name, g in grads.items():
        rel = (stic_grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel <= 1e-4, f"{name}: relative gradient error {rel:.2e}"


@pytest.mark.parametrize("scoring,checkpointing", [("paper", "false"), ("official_top_token", "true")])
def test_shared_prefix_trains_like_unshared(hf_models, tmp_path, scoring, checkpointing):
    """5 steps of 2 pairs per micro-batch: the shared prefix gives the losses, rewards and adapter of each row run
    alone."""
    _, folder = hf_models["gqa"]
    data = write_edge_pairs(tmp_path / "pairs.jsonl")
    common = ["--max-steps", "5", "--batch-size", "2", "--lr", "1e-3", "--projector-lr", "1e-3",
              "--rejected-scoring", scoring, "--gradient-checkpointing", checkpointing]
    train_dpo(folder, data, tmp_path / "shared", *common)
    train_dpo(folder, data, tmp_path / "unshared", *common, "--no-shared-prefix")
    a = load_file(tmp_path / "shared" / "adapter_model.safetensors")
    b = load_file(tmp_path / "unshared" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    rows = lambda d: [r.split(",") for r in (tmp_path / d / "train_log.csv").read_text().splitlines()]  # noqa: E731
    header, shared, unshared = rows("shared")[0], rows("shared")[1:], rows("unshared")[1:]
    assert len(shared) == 5
    for column in ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]:
        i = header.index(column)
        for s, u in zip(shared, unshared):  # f32 relative precision, plus the log's 6 decimals
            assert abs(float(s[i]) - float(u[i])) <= 1e-6 * max(1.0, abs(float(u[i]))) + 1e-6, (column, s[i], u[i])


SFT_ENTRIES = [
    {"id": "two_turns", "image": "chelsea.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat animal is this?"}, {"from": "gpt", "value": "A cat on a sofa."},
        {"from": "human", "value": "What colour is the sofa?"}, {"from": "gpt", "value": "It is red."}]},
    {"id": "text_only", "conversations": [
        {"from": "human", "value": "Name a prime number."}, {"from": "gpt", "value": "Seven is a prime number."}]},
    {"id": "one_turn", "image": "coffee.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A cup of coffee."}]},
]


def test_packed_sft_equals_padded_transformers(hf_models, tmp_path):
    """One packed micro-batch of rows of different lengths (two images, one text-only row; sliding window shorter
    than the prompts; checkpointing) against transformers + PEFT on the padded batch."""
    _, folder = hf_models["mqa_window"]
    adapter, _ = peft_adapter(tiny_models.build_model("mqa_window", seed=1), tmp_path / "adapter")
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(SFT_ENTRIES))
    dump_path = tmp_path / "dump.safetensors"
    run_stic("train-sft", "--model", folder, "--data", data, "--image-dir", IMAGES, "--output", tmp_path / "out",
             "--init-adapter", adapter, "--batch-size", "3", "--grad-accum", "1", "--lora-dropout", "0",
             "--max-length", "4096", "--dtype", "f32", "--device", DEVICE, "--gradient-checkpointing", "true",
             "--dump-first-step", dump_path)
    dump = load_file(dump_path)
    ids, mask, scored = dump["input_ids"], dump["attention_mask"], dump["scored"].bool()
    assert (mask == 0).any(), "the rows should differ in length"

    base = tiny_models.LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    pix = tiny_models.processor().image_processor([Image.open(IMAGES / e["image"]) for e in SFT_ENTRIES if "image" in e],
                                                  return_tensors="pt")
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix["pixel_values"],
                   image_sizes=pix["image_sizes"]).logits
    lp = logits[:, :-1].float().log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
    loss = -(lp * scored[:, 1:]).sum() / scored[:, 1:].sum()
    loss.backward()
    assert abs(dump["loss"].item() - loss.item()) <= 1e-5 * max(1.0, loss.item()), (dump["loss"].item(), loss.item())
    stic_grads = {canonical(k[len("grad."):]): v for k, v in dump.items() if k.startswith("grad.")}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            rel = (stic_grads[canonical(name)] - g).norm() / g.norm().clamp_min(1e-12)
            assert rel <= 1e-4, f"{name}: relative gradient error {rel:.2e}"


def test_a_global_batch_larger_than_the_data_takes_each_example_once(hf_models, tmp_path):
    """4 pairs at global batch 8 (1 x 8 micro-batches, as the shipped stage-1 config): one step over the 4 pairs,
    each once, as transformers' Trainer makes the last step of an epoch, the same step as one micro-batch of 4."""
    _, folder = hf_models["gqa"]
    data = write_edge_pairs(tmp_path / "pairs.jsonl")
    common = ["--model", folder, "--data", data, "--image-dir", IMAGES, "--lora-r", "4", "--lora-dropout", "0",
              "--lr", "1e-3", "--projector-lr", "1e-3", "--max-length", "4096", "--dtype", "f32", "--device", DEVICE]
    run_stic("train-dpo", *common, "--output", tmp_path / "accumulated", "--batch-size", "1", "--grad-accum", "8")
    run_stic("train-dpo", *common, "--output", tmp_path / "one", "--batch-size", "4", "--grad-accum", "1")
    a = load_file(tmp_path / "accumulated" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    logs = [(tmp_path / d / "train_log.csv").read_text().splitlines() for d in ("accumulated", "one")]
    assert len(logs[0]) == len(logs[1]) == 2  # header and one step
    loss = [float(log[1].split(",")[log[0].split(",").index("loss")]) for log in logs]
    assert abs(loss[0] - loss[1]) <= 1e-6, loss
