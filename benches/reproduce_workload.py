"""What `make reproduce` computes, and its time estimated from measured rates: shared by bench_generate.py,
bench_train.py and gpu_check.py (standard library only, so that it runs on a bare GPU machine)."""

# What `make reproduce` generates (configs/paper/reproduce.yaml, third_party/stic): stage 1 describes 6,275 COCO images
# twice (max 1,024 new tokens), stage 2 describes 5,000 instruction images, and the evaluation answers the seven
# benchmarks (~26k items with MMBench circular) for 4 configurations, two of them DaR (a description per item).
# Mean response lengths are assumptions (no real model here): descriptions about 400 tokens (the STIC preference
# data's responses run from a few dozen to 1,024), short answers 8, the long-answer benchmarks (LLaVA-Bench 60,
# MM-Vet 218, MathVista 1,000 items) 200.
REPRODUCE = dict(stage1_images=6275, stage2_descriptions=5000, eval_items=26000, eval_configs=4, dar_configs=2,
                 long_answer_items=1278, mean_description=400, mean_short_answer=8, mean_long_answer=200)
# make reproduce's training: stage 1 = 6,275 pairs, stage 2 = 5,000 conversations (max length 2,048), 1 epoch each
STAGE1_PAIRS, STAGE2_CONVERSATIONS, STAGE2_MAX_LENGTH = 6275, 5000, 2048
# language-model parameters of LLaVA-v1.6-Mistral-7B (what the estimates scale a smaller model's rates to)
LM_PARAMS_7B = 7.11e9


def estimate_reproduce(engine, prompt_lengths, lm_params):
    """Hours of generation for `make reproduce` at this run's engine rates, scaled to the 7B model's size when the
    benchmark model is smaller: prompt tokens / measured prefill tokens/s + new tokens / measured generated tokens/s.
    Prompt lengths are this run's mean per kind (image tokens included); the stage-1 hallucination prompts (half)
    share their image's prefix with the preferred prompt and count only their own text."""
    r = REPRODUCE
    image_tokens, preferred, description, question = (prompt_lengths[k] for k in
                                                      ("image", "preferred", "description", "question"))
    stage1_prompt = r["stage1_images"] * (preferred + description) - 0.5 * r["stage1_images"] * image_tokens
    stage1_new = r["stage1_images"] * 2 * r["mean_description"]
    stage2_prompt = r["stage2_descriptions"] * description
    stage2_new = r["stage2_descriptions"] * r["mean_description"]
    answers = r["eval_configs"] * r["eval_items"]
    dar_descriptions = r["dar_configs"] * r["eval_items"]
    eval_prompt = answers * question + dar_descriptions * (description + r["mean_description"])
    eval_new = (r["eval_configs"] * ((r["eval_items"] - r["long_answer_items"]) * r["mean_short_answer"]
                                     + r["long_answer_items"] * r["mean_long_answer"])
                + dar_descriptions * r["mean_description"])
    scale = LM_PARAMS_7B / lm_params
    prompt, new = stage1_prompt + stage2_prompt + eval_prompt, stage1_new + stage2_new + eval_new
    hours = scale * (prompt / engine["prefill_tok_s"] + new / engine["generated_tok_s"]) / 3600
    return dict(prompt_tokens=prompt, new_tokens=new, scale_to_7b=scale, hours=hours,
                assumptions={k: v for k, v in REPRODUCE.items()}, prompt_lengths=prompt_lengths)
