#!/usr/bin/env bash
# `make demo`: the whole STIC pipeline at toy scale on a random tiny model, on CPU, in a few minutes.
# The tiny model is random, so every text it writes is noise; the same commands on the real model are
# `make reproduce`.
set -euo pipefail
cd "$(dirname "$0")/.."
STIC=target/release/stic
OUT=results/demo
IMAGES=data/images
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }
common=(--device cpu)

step "1/8 init-tiny: a random LLaVA-NeXT-Mistral model with the real geometry -> $OUT/model"
$STIC init-tiny --output "$OUT/model"

step "2/8 prefs: preferred and dispreferred descriptions of the 8 sample images -> $OUT/prefs.jsonl"
$STIC prefs --model "$OUT/model" --image-dir "$IMAGES" --output "$OUT/prefs.jsonl" --max-new-tokens 48 \
  --batch-size 8 "${common[@]}"

step "3/8 train-dpo: stage 1, LoRA + DPO with the chosen-likelihood term -> $OUT/stage1"
# A learning rate far above the paper's 1e-7, so that 16 steps on a random model move visibly.
$STIC train-dpo --model "$OUT/model" --data "$OUT/prefs.jsonl" --image-dir "$IMAGES" --output "$OUT/stage1" \
  --max-steps 16 --batch-size 2 --grad-accum 1 --lr 2e-3 --projector-lr 1e-3 --lora-r 8 --lora-alpha 16 \
  --save-steps 8 "${common[@]}"

step "4/8 describe: the stage-1 model describes the instruction images -> $OUT/descriptions.jsonl"
$STIC describe --model "$OUT/model" --adapter "$OUT/stage1" --data data/demo/instructions.json \
  --image-dir "$IMAGES" --output "$OUT/descriptions.jsonl" --max-new-tokens 32 "${common[@]}"

step "5/8 infuse: descriptions into the first user turns -> $OUT/instructions_infused.json"
$STIC infuse --data data/demo/instructions.json --descriptions "$OUT/descriptions.jsonl" \
  --output "$OUT/instructions_infused.json"

step "6/8 train-sft: stage 2 from the stage-1 adapter -> $OUT/stage2"
$STIC train-sft --model "$OUT/model" --init-adapter "$OUT/stage1" --data "$OUT/instructions_infused.json" \
  --image-dir "$IMAGES" --output "$OUT/stage2" --max-steps 8 --batch-size 2 --grad-accum 1 --lr 1e-3 \
  "${common[@]}"

step "7/8 eval: ScienceQA-format questions with describe-and-respond -> $OUT/eval"
$STIC eval --model "$OUT/model" --adapter "$OUT/stage2" --benchmark scienceqa --data data/demo/eval/scienceqa \
  --output "$OUT/eval" --dar --max-new-tokens 8 --description-max-new-tokens 24 "${common[@]}"

step "8/8 plot: DPO loss and reward margins -> $OUT/dpo_curves.png"
.venv/bin/python tools/plot_train_log.py "$OUT/stage1/train_log.csv" "$OUT/dpo_curves.png" \
  --title "make demo: STIC stage 1 on a random tiny model"

printf '\nDone. Everything is in %s/ (the model is random: its text is noise; `make reproduce` runs the real thing).\n' "$OUT"
