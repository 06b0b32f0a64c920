"""`make reproduce`: the STIC paper end to end with the `stic` binary, from configs/reproduce.yaml.

Stage-1 preferences on the 6k COCO images, DPO, descriptions of a 5k instruction subset, infusion, SFT, then the
seven benchmarks for the original model and for STIC with describe-and-respond; writes results/reproduce.md with
the paper's table beside the measured one. Every step skips what is already done, so a rerun continues.
"""
import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STIC = ROOT / "target" / "release" / "stic"
WHERE = {
    "model": "huggingface.co/llava-hf/llava-v1.6-mistral-7b-hf (config.json, tokenizer.json, *.safetensors)",
    "coco_train2014": "images.cocodataset.org/zips/train2014.zip, unzipped",
    "instruction_json": "huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K: llava_v1_5_mix665k.json",
    "instruction_images": "the image folders listed in LLaVA's README (coco, gqa, ocr_vqa, textvqa, vg)",
    "eval_root": "LLaVA-1.5's eval.zip (playground/data/eval) plus each benchmark's images, per docs/Evaluation.md of LLaVA",
}


def resolve_paths(cfg):
    paths = dict(cfg["paths"])
    for key, var in cfg["env"].items():
        if os.environ.get(var):
            paths[key] = os.environ[var]
    return {k: Path(v) if not Path(v).is_absolute() and k == "output" and not str(v).startswith("/") else Path(v)
            for k, v in paths.items()}


def check_inputs(paths, cfg):
    missing = []
    for key in ("model", "coco_train2014", "instruction_json", "instruction_images", "eval_root"):
        if not paths[key].exists():
            missing.append(f"  {key}: {paths[key]} (set {cfg['env'][key]}; get it from {WHERE[key]})")
    if paths["eval_root"].exists():
        for bench, folder in cfg["eval"]["benchmarks"].items():
            if not (paths["eval_root"] / folder).is_dir():
                missing.append(f"  eval data for {bench}: {paths['eval_root'] / folder} ({WHERE['eval_root']})")
    if missing:
        sys.exit("make reproduce cannot start; missing:\n" + "\n".join(missing))


def run(*args):
    print("+ stic " + " ".join(map(str, args)), flush=True)
    subprocess.run([str(STIC), *map(str, args)], check=True)


def train(kind, model, data, image_dir, out, config, *extra):
    if (out / "adapter_model.safetensors").exists():
        print(f"= {out} done")
        return
    resume = ["--resume"] if (out / "checkpoints" / "latest").exists() else []
    run(f"train-{kind}", "--model", model, "--data", data, "--image-dir", image_dir, "--output", out,
        "--config", ROOT / config, *extra, *resume)


def evaluate(model, adapter, bench, data, out, dar, judge_url):
    extra = (["--adapter", adapter] if adapter else []) + (["--dar"] if dar else [])
    extra += ["--judge-url", judge_url] if judge_url else []
    if not (out / "summary.json").exists():
        run("eval", "--model", model, "--benchmark", bench, "--data", data, "--output", out, *extra)
    summary = json.loads((out / "summary.json").read_text())
    return None if summary.get("accuracy") is None else 100 * summary["accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "reproduce.yaml"))
    args = parser.parse_args()
    cfg = yaml.safe_load(open(args.config))
    paths = resolve_paths(cfg)
    check_inputs(paths, cfg)
    out = paths["output"]
    out.mkdir(parents=True, exist_ok=True)
    model = paths["model"]

    prefs = out / "stage1_prefs.jsonl"
    run("prefs", "--model", model, "--image-dir", paths["coco_train2014"], "--images", ROOT / cfg["stage1"]["images"],
        "--output", prefs, "--batch-size", cfg["stage1"]["batch_size"])
    stage1 = out / "stage1_adapter"
    train("dpo", model, prefs, paths["coco_train2014"], stage1, cfg["stage1"]["config"])

    subset = out / "stage2_instructions.json"
    if not subset.exists():
        data = json.loads(paths["instruction_json"].read_text())
        with_images = [e for e in data if e.get("image")]
        random.Random(cfg["stage2"]["seed"]).shuffle(with_images)
        subset.write_text(json.dumps(with_images[: cfg["stage2"]["subset"]]))
    descriptions = out / "stage2_descriptions.jsonl"
    run("describe", "--model", model, "--adapter", stage1, "--data", subset, "--image-dir",
        paths["instruction_images"], "--output", descriptions)
    infused = out / "stage2_infused.json"
    if not infused.exists():
        run("infuse", "--data", subset, "--descriptions", descriptions, "--output", infused)
    stage2 = out / "stage2_adapter"
    train("sft", model, infused, paths["instruction_images"], stage2, cfg["stage2"]["config"], "--init-adapter", stage1)

    rows = []
    judge = cfg["eval"].get("judge_url")
    for bench, folder in cfg["eval"]["benchmarks"].items():
        data = paths["eval_root"] / folder
        base = evaluate(model, None, bench, data, out / "eval" / "original" / bench, False, judge)
        stic = evaluate(model, stage2, bench, data, out / "eval" / "stic_dar" / bench, True, judge)
        rows.append((bench, cfg["paper"]["original"][bench], base, cfg["paper"]["stic_dar"][bench], stic))
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["# STIC reproduction: LLaVA-v1.6-Mistral-7B", "",
             "| benchmark | paper original | measured original | paper STIC+DaR | measured STIC+DaR |",
             "|---|---|---|---|---|"]
    lines += [f"| {b} | {fmt(po)} | {fmt(mo)} | {fmt(ps)} | {fmt(ms)} |" for b, po, mo, ps, ms in rows]
    measured = [r for r in rows if r[2] is not None and r[4] is not None]
    if measured:
        avg = lambda i: sum(r[i] for r in measured) / len(measured)  # noqa: E731
        lines.append(f"| average ({len(measured)} scored) | {fmt(avg(1))} | {fmt(avg(2))} | {fmt(avg(3))} | {fmt(avg(4))} |")
    lines += ["", "A dash: graded by an LLM judge and no `eval.judge_url` was configured; the files for the official "
              "graders are in the benchmark's output folder."]
    report = ROOT / "results" / "reproduce.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    print(report.read_text())


if __name__ == "__main__":
    main()
