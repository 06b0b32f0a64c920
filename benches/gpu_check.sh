#!/usr/bin/env bash
# The prepared device check (issue 21): `make gpu-check`, or on a lent GPU machine with only python3 + torch and a
# stic binary built elsewhere:   benches/gpu_check.sh [STIC_BINARY] [--dry-run] [--steps a,b] [--out FILE]
# Points the binary at this python's libtorch (LD_LIBRARY_PATH, searched before the RUNPATH of the build machine),
# runs benches/gpu_check.py (which keeps its steps within 8 minutes, 16 for the dry run) under a backstop limit,
# and leaves its JSON under results/gpu/.
set -u
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
libtorch=$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib || exit 1
export LD_LIBRARY_PATH="$libtorch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYTHONUNBUFFERED=1
limit=510
[[ " $* " == *" --dry-run "* ]] && limit=990
exec timeout --kill-after 10 "$limit" "$py" benches/gpu_check.py "$@"
