#!/usr/bin/env bash
# `make check-cuda`: the checks that need a CUDA GPU, in one run, each under its own time limit:
#   dist-check      NCCL under torchrun (world size 1 on a one-GPU machine)
#   parity          the transformers / PEFT parity tests with stic on the GPU (STIC_TEST_DEVICE=cuda; the
#                   reference stays on the CPU in f32), and the engine (CUDA graphs) against one-by-one generation
#   bench-generate  make bench-generate --full-size (exact 7B shapes, bf16)
#   bench-train     make bench-train --full-size (7B shapes, r 128, bf16, beside TRL), sharing the 7B model folder
# Usage: benches/cuda_checks.sh [OUT_DIR [STEP...]]   (default results/cuda and every step; OUT_DIR gets the logs,
# summary.txt and the benchmark JSON)
# Runs with .venv/bin/python where `make setup` made one, else with python3 (a GPU machine with PyTorch, the
# pinned transformers/peft/pillow on PYTHONPATH, and a stic binary built elsewhere).
set -u
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-results/cuda}")
mkdir -p "$out"
shift
steps=" ${*:-dist-check parity bench-generate bench-train} "
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
libtorch=$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$libtorch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYTHONUNBUFFERED=1
model_dir=${STIC_FULL_MODEL_DIR:-/tmp/stic-full-size-model}
failed=0

step() {  # name, seconds, command...
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    [[ $steps == *" $name "* ]] || return 0
    echo "== $name (limit ${limit} s)"
    timeout --kill-after 10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 20 "$out/$name.log"
    echo "$name: exit $rc after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
    [ "$rc" = 0 ] || failed=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/summary.txt"
step dist-check 60 "$py" -m torch.distributed.run --nproc-per-node 1 --no-python target/release/stic dist-check \
    --device cuda
step parity 150 env STIC_TEST_DEVICE=cuda "$py" -m pytest -q -x -n 4 -p no:cacheprovider \
    tests/python/test_parity.py tests/python/test_dpo.py tests/python/test_engine.py \
    -k "test_parity or peft or reward_accuracy or one_by_one"
step bench-generate 300 "$py" benches/bench_generate.py --full-size --model-dir "$model_dir"
step bench-train 900 "$py" benches/bench_train.py --full-size --model-dir "$model_dir"
cp results/bench/generate-full.json results/bench/train-full.json "$out/" 2>/dev/null
exit $failed
