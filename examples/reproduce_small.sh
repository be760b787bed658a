#!/usr/bin/env bash
# The small end-to-end PoSE reproduction on CPU (2 processes): data, pretraining at 128, extensions
# to 1024 (seven methods, three seeds, the paper's equal steps and sequences), evaluation, tables and
# figure. About 150 CPU-minutes (a few hours on 2 shared cores); --quick: every stage in minutes.
#   examples/reproduce_small.sh [--quick] [--out DIR] [--docs-dir docs] [--until STEP] [--force]
# Stages are cached under --out (default outputs/reproduce): rerun the same command to resume; see
# experiments/pose_small/reproduce.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
cd "$ROOT"
exec "$PYTHON" -m experiments.pose_small.reproduce "$@"
