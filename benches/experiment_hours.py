"""Device hours of each of the paper's experiments (docs/reproduce.md), from measured rates.

    python3 benches/experiment_hours.py                          # the H200 rates of docs/speed.md (2026-11)
    python3 benches/experiment_hours.py --check results/gpu/gpu_check-DATE-HOST.json   # a device check's rates
    stic reproduce --profile official --sweep paper --plan > plan.txt
    python3 benches/experiment_hours.py --sweep-plan plan.txt        # + the quirk sweep: the steps it would run

Without --check the rates are the only 7B GPU figures measured so far (one H200, bf16, before the generation engine
and the shared-prefix DPO, docs/speed.md "On a GPU"): prefill 8 x 1,481 tokens in 0.363 s, decode 133.7 tokens/s at
batch 8, a DPO pair of 2 x 2,309 tokens in 1.28 s, and SFT at that step's FLOP rate (8/6 of its tokens/s). The prompt
lengths are those of the device check's mix (the tiny model has the 7B image geometry and the Mistral tokenizer).
Standard library only."""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_workload import (LM_PARAMS_7B, estimate_reproduce, experiment_hours, plan_hours,  # noqa: E402
                                stage1_training_hours, stage2_training_hours)

H200_2026_11 = dict(prefill_tok_s=8 * 1481 / 0.363, generated_tok_s=133.7, dpo_pair_s=1.28,
                    sft_tok_s=2 * 2309 / 1.28 * 8 / 6)
# mean prompt tokens per kind in the device check's mix (its dry run's `prompt_lengths`)
CHECK_PROMPT_LENGTHS = dict(image=1464, preferred=3099, description=1484, question=1488)


def parts_from_rates(rates, prompt_lengths):
    generation = estimate_reproduce(rates, prompt_lengths, LM_PARAMS_7B)
    return (generation["part_hours"], stage1_training_hours(rates["dpo_pair_s"]),
            stage2_training_hours(rates["sft_tok_s"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", type=Path, help="a gpu_check JSON whose estimate step ran")
    parser.add_argument("--sweep-plan", type=Path, help="the output of `stic reproduce --sweep ... --plan`")
    args = parser.parse_args()
    if args.check:
        steps = {s["name"]: s for s in json.loads(args.check.read_text())["steps"]}
        estimate = steps.get("estimate", {})
        if estimate.get("status") != "ok":
            sys.exit(f"{args.check}: its estimate step did not run (status {estimate.get('status')}); "
                     "run benches/gpu_check.sh to the end")
        m = estimate["measurements"]
        parts = (m["generation"]["part_hours"], m["stage1_training_hours"], m["stage2_training_hours_at_most"])
        basis = m["basis"]
    else:
        parts, basis = parts_from_rates(H200_2026_11, CHECK_PROMPT_LENGTHS), "H200 rates of 2026-11 (before the engine)"
    print(f"device hours on one GPU, {basis}\n")
    print("| paper | experiment | hours |\n|---|---|---|")
    for r in experiment_hours(*parts):
        print(f"| {r['paper']} | {r['experiment']} | {r['hours']:.1f} |")
    if args.sweep_plan:
        sweep = plan_hours(args.sweep_plan.read_text(), *parts)
        print(f"\n{args.sweep_plan}: {len(sweep['runs'])} runs, {sweep['hours']:.1f} hours in all\n")
        print("| run | steps to run | hours |\n|---|---|---|")
        for r in sweep["runs"]:
            print(f"| {r['run']} | {r['steps']} | {r['hours']:.1f} |")


if __name__ == "__main__":
    main()
