"""benches/experiment_hours.py: the device hours of the paper's experiments, and of the quirk sweep from its plan."""
import re
import subprocess
import sys

from conftest import ROOT, run_stic

sys.path.insert(0, str(ROOT / "benches"))
from experiment_hours import CHECK_PROMPT_LENGTHS, H200_2026_11, parts_from_rates  # noqa: E402
from reproduce_workload import EVAL_ITEMS, estimate_reproduce, experiment_hours, plan_hours  # noqa: E402


def test_the_sweep_is_costed_step_by_step_from_its_plan(tmp_path):
    plan = run_stic("reproduce", "--profile", "official", "--sweep", "paper", "--plan").stdout
    to_run = int(re.search(r"(\d+) of \d+ steps to run", plan).group(1))
    generation, stage1, stage2 = parts_from_rates(H200_2026_11, CHECK_PROMPT_LENGTHS)
    sweep = plan_hours(plan, generation, stage1, stage2)
    assert len(sweep["runs"]) == 22
    assert sum(r["steps"] for r in sweep["runs"]) == to_run
    runs = {r["run"]: r for r in sweep["runs"]}
    # the official base run: stage 1 and 2, both models on every benchmark, DaR on MMBench alone
    answers = sum(generation[f"answers:{b}"] for b in EVAL_ITEMS)
    official = (generation["stage1"] + stage1 + generation["stage2"] + stage2 + 2 * answers
                + 2 * (generation["answers:mmbench"] + generation["dar:mmbench"]))
    assert abs(runs["base"]["hours"] - official) < 1e-9
    assert runs["eval.judge_runs: 1 -> 3"] == dict(run="eval.judge_runs: 1 -> 3", hours=0.0, steps=1)  # the report
    assert abs(sweep["hours"] - sum(r["hours"] for r in sweep["runs"])) < 1e-9
    # a training switch of stage 2 redoes its training and STIC's evaluations: not stage 1, not the descriptions
    stage2_switch = runs["stage2.config.max_length: 2048 -> 4416"]["hours"]
    stic_rows = answers + generation["answers:mmbench"] + generation["dar:mmbench"]
    assert abs(stage2_switch - (stage2 + stic_rows)) < 1e-9

    plan_file = tmp_path / "plan.txt"
    plan_file.write_text(plan)
    out = subprocess.run([sys.executable, ROOT / "benches" / "experiment_hours.py", "--sweep-plan", plan_file],
                         capture_output=True, text=True, check=True).stdout
    assert "| Table 2 | make reproduce: the four rows |" in out
    assert f"22 runs, {sweep['hours']:.1f} hours in all" in out


def test_make_reproduce_is_the_sum_of_its_parts():
    rates = dict(prefill_tok_s=1e4, generated_tok_s=100.0)
    estimate = estimate_reproduce(rates, CHECK_PROMPT_LENGTHS, 7.11e9)
    rows = {r["experiment"]: r["hours"] for r in experiment_hours(estimate["part_hours"], 2.0, 1.0)}
    assert abs(rows["make reproduce: the four rows"] - (estimate["hours"] + 3.0)) < 1e-9
    # the 30k images of Fig. 6 cost more than the 12k, and 6k of another source less than both
    assert rows["+ 30k stage-1 images"] > rows["+ 12k stage-1 images"] > rows["+ 6k images of another source"]
