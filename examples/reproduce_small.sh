#!/usr/bin/env bash
# The small end-to-end PoSE reproduction on CPU (2 processes): data, pretraining at 256, six
# extensions to 2048, evaluation, tables and figure. About an hour on 2 cores; --quick: < 3 minutes.
#   examples/reproduce_small.sh [--quick] [--out DIR] [--docs-dir docs] [--methods a,b] [--force]
# Stages are cached under --out (default outputs/reproduce); see experiments/pose_small/reproduce.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
cd "$ROOT"
exec "$PYTHON" -m experiments.pose_small.reproduce "$@"
