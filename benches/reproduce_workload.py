"""What `make reproduce` and the paper's other experiments compute, and their time estimated from measured rates:
shared by bench_generate.py, bench_train.py, gpu_check.py and experiment_hours.py (standard library only, so that it
runs on a bare GPU machine)."""
import re

# What `make reproduce` generates (configs/paper/reproduce.yaml, third_party/stic): stage 1 describes 6,275 COCO images
# twice (max 1,024 new tokens), stage 2 describes 5,000 instruction images, and the evaluation answers the seven
# benchmarks (~26k items with MMBench circular) for 4 configurations, two of them DaR (a description per item).
# Mean response lengths are assumptions (no real model here): descriptions about 400 tokens (the STIC preference
# data's responses run from a few dozen to 1,024), short answers 8, the long-answer benchmarks (LLaVA-Bench 60,
# MM-Vet 218, MathVista 1,000 items) 200.
REPRODUCE = dict(stage1_images=6275, stage2_descriptions=5000, eval_items=26000, eval_configs=4, dar_configs=2,
                 long_answer_items=1278, mean_description=400, mean_short_answer=8, mean_long_answer=200)
# The items per benchmark behind eval_items: ScienceQA's llava_test_CQM-A.json, TextVQA val, ChartQA test (human +
# augmented), MMBench dev with its circular rounds (the rest of the 26,000), and the long-answer benchmarks.
EVAL_ITEMS = {"scienceqa": 4241, "textvqa": 5000, "chartqa": 2500, "mmbench": 12981, "llava-bench": 60, "mm-vet": 218,
              "mathvista": 1000}
LONG_ANSWER_BENCHMARKS = ("llava-bench", "mm-vet", "mathvista")
# make reproduce's training: stage 1 = 6,275 pairs, stage 2 = 5,000 conversations (max length 2,048), 1 epoch each
STAGE1_PAIRS, STAGE2_CONVERSATIONS, STAGE2_MAX_LENGTH = 6275, 5000, 2048
# language-model parameters of LLaVA-v1.6-Mistral-7B (what the estimates scale a smaller model's rates to)
LM_PARAMS_7B = 7.11e9
# A stage-1 SFT step (the paper's Table 3) trains on a pair's chosen side alone with no reference model: 6·N·T/2 of
# the DPO pair's 8·N·T (policy forward + backward on both sides, reference forward on both).
SFT_STAGE1_OVER_DPO = 6 / 2 / 8


def stage1_training_hours(dpo_pair_s):
    """`make reproduce`'s stage 1 at one DPO pair per step."""
    return STAGE1_PAIRS * dpo_pair_s / 3600


def stage2_training_hours(sft_tok_s):
    """`make reproduce`'s stage 2 at most: every conversation STAGE2_MAX_LENGTH tokens."""
    return STAGE2_CONVERSATIONS * STAGE2_MAX_LENGTH / sft_tok_s / 3600


def generation_parts(prompt_lengths):
    """Prompt and new tokens of each generation part of `make reproduce`: the stage-1 pairs, the stage-2
    descriptions, and per benchmark one evaluation configuration's answers (`answers:NAME`) and one DaR
    configuration's descriptions (`dar:NAME`). Prompt lengths are a run's mean per kind (image tokens included); the
    stage-1 hallucination prompts (half) share their image's prefix with the preferred prompt and count only their
    own text."""
    r = REPRODUCE
    image_tokens, preferred, description, question = (prompt_lengths[k] for k in
                                                      ("image", "preferred", "description", "question"))
    parts = dict(
        stage1=(r["stage1_images"] * (preferred + description) - 0.5 * r["stage1_images"] * image_tokens,
                r["stage1_images"] * 2 * r["mean_description"]),
        stage2=(r["stage2_descriptions"] * description, r["stage2_descriptions"] * r["mean_description"]),
    )
    for name, items in EVAL_ITEMS.items():
        answer = r["mean_long_answer"] if name in LONG_ANSWER_BENCHMARKS else r["mean_short_answer"]
        parts[f"answers:{name}"] = (items * question, items * answer)
        parts[f"dar:{name}"] = (items * (description + r["mean_description"]), items * r["mean_description"])
    return parts


def estimate_reproduce(engine, prompt_lengths, lm_params):
    """Hours of generation for `make reproduce` at this run's engine rates, scaled to the 7B model's size when the
    benchmark model is smaller: prompt tokens / measured prefill tokens/s + new tokens / measured generated tokens/s
    (see `generation_parts`)."""
    r = REPRODUCE
    parts = generation_parts(prompt_lengths)
    counts = {k: r["eval_configs"] if k.startswith("answers:") else r["dar_configs"] if k.startswith("dar:") else 1
              for k in parts}
    prompt = sum(counts[k] * parts[k][0] for k in parts)
    new = sum(counts[k] * parts[k][1] for k in parts)
    scale = LM_PARAMS_7B / lm_params
    hours = scale * (prompt / engine["prefill_tok_s"] + new / engine["generated_tok_s"]) / 3600
    part_hours = {k: scale * (p / engine["prefill_tok_s"] + n / engine["generated_tok_s"]) / 3600
                  for k, (p, n) in parts.items()}
    return dict(prompt_tokens=prompt, new_tokens=new, scale_to_7b=scale, hours=hours, part_hours=part_hours,
                assumptions={k: v for k, v in REPRODUCE.items()}, prompt_lengths=prompt_lengths)


def experiment_hours(generation_part_hours, stage1_training_hours, stage2_training_hours):
    """Device hours of each of the paper's experiments on one device: what it runs beyond the steps it shares with
    `make reproduce` (which is the first row, whole). Generation parts are `estimate_reproduce`'s `part_hours`;
    stage 1 trains on 6,275 pairs, stage 2 on 5,000 conversations."""
    g = generation_part_hours
    stage2 = g["stage2"] + stage2_training_hours
    answers = sum(h for k, h in g.items() if k.startswith("answers:"))
    dar = answers + sum(h for k, h in g.items() if k.startswith("dar:"))
    # a new stage-1 adapter: stage 2 again, and STIC and STIC + DaR evaluated
    downstream = stage2 + answers + dar

    def stage1_images(n):
        return n / STAGE1_PAIRS * (g["stage1"] + stage1_training_hours) + downstream

    rows = [
        ("Table 2", "make reproduce: the four rows", g["stage1"] + stage1_training_hours + stage2 + 2 * answers
         + 2 * dar),
        ("Table 2 / Fig. 5", "+ the stage-1-only row (eval.stage1_row)", answers),
        ("Table 3", "+ stage 1 as SFT (stage1.method: sft; pairs shared)",
         SFT_STAGE1_OVER_DPO * stage1_training_hours + downstream),
        ("Table 9", "+ one more DaR prompt (eval.dar_prompt), STIC + DaR", dar),
        ("Fig. 6", "+ 12k stage-1 images", stage1_images(12000)),
        ("Fig. 6", "+ 30k stage-1 images", stage1_images(30000)),
        ("Table 4", "+ 6k images of another source", stage1_images(6000)),
        ("Fig. 4, Tables 7, 8", "+ MMBench and MM-Vet categories, LLaVA-Bench judge runs", 0.0),
    ]
    return [dict(paper=p, experiment=e, hours=h) for p, e, h in rows]


def plan_hours(plan_text, generation_part_hours, stage1_training_hours, stage2_training_hours):
    """Device hours of the steps that `stic reproduce --plan` (a sweep's plan included) marks *to run*: per run of
    the plan, and in all. Steps with no generation or training (stage2-subset, infuse, report, ...) count 0."""
    g = generation_part_hours
    costs = {"prefs": g["stage1"], "train-dpo": stage1_training_hours,
             "train-stage1-sft": SFT_STAGE1_OVER_DPO * stage1_training_hours, "describe": g["stage2"],
             "train-sft": stage2_training_hours}
    runs, run = [], None
    for line in plan_text.splitlines():
        header = re.match(r"\s*\d+\. (.+?) \(", line)
        step = re.match(r"\s+(\S+) \[to run\]", line)
        if header:
            run = dict(run=header.group(1), hours=0.0, steps=0)
            runs.append(run)
        elif step and run is not None:
            name = step.group(1)
            evaluation = re.match(r"eval-(\w+)-(.+)$", name)
            if evaluation:
                row, benchmark = evaluation.groups()
                hours = g[f"answers:{benchmark}"] + (g[f"dar:{benchmark}"] if row.endswith("_dar") else 0.0)
            else:
                hours = costs.get(name, 0.0)
            run["hours"] += hours
            run["steps"] += 1
    return dict(runs=runs, hours=sum(r["hours"] for r in runs))
