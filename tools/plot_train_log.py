"""Plots a `train_log.csv` of `stic train-dpo`: loss, reward margins and accuracy over optimizer steps."""
import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("log", help="train_log.csv")
    parser.add_argument("output", help="PNG to write")
    parser.add_argument("--title", default="STIC stage 1 (DPO)")
    args = parser.parse_args()
    rows = list(csv.DictReader(open(args.log)))
    if not rows:
        raise SystemExit(f"{args.log}: no steps logged")
    steps = [int(r["step"]) for r in rows]
    col = lambda name: [float(r[name]) for r in rows]  # noqa: E731
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, col("loss"), marker="o", color="tab:red")
    left.set(title="loss", xlabel="optimizer step")
    right.plot(steps, col("rewards/margins"), marker="o", label="reward margin (chosen - rejected)")
    right.plot(steps, col("rewards/chosen"), linestyle="--", label="reward chosen")
    right.plot(steps, col("rewards/rejected"), linestyle="--", label="reward rejected")
    right.axhline(0, color="grey", linewidth=0.5)
    right.set(title="rewards", xlabel="optimizer step")
    right.legend(fontsize=8)
    acc = right.twinx()
    acc.plot(steps, col("rewards/accuracies"), color="tab:green", alpha=0.4, label="accuracy")
    acc.set_ylim(-0.05, 1.05)
    acc.set_ylabel("reward accuracy", color="tab:green")
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"plot: {args.output}")


if __name__ == "__main__":
    main()
