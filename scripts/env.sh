# Sourced by the README's commands: create or reuse the project-local virtual environment.
#   source scripts/env.sh [EXTRA]   (EXTRA: "test" for the test suite; empty for training)
# On machines without CUDA, torch==2.13.0 is installed first (a CPU wheel; an unpinned torch would
# pull a CUDA build of several GB). With CUDA (e.g. an NGC container) the venv sees the system's
# site-packages, so the container's torch, Transformer Engine and apex are used as they are.
set -euo pipefail
POSE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
POSE_VENV=${POSE_VENV:-$POSE_ROOT/.venv}
_extra=${1:-}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  _has_cuda=1
else
  _has_cuda=0
fi

if [ ! -x "$POSE_VENV/bin/python" ]; then
  echo "[env] creating $POSE_VENV"
  if [ "$_has_cuda" = 1 ]; then
    python3 -m venv --system-site-packages "$POSE_VENV"
  else
    python3 -m venv "$POSE_VENV"
  fi
fi

# Reinstall only when setup.py changes (or a new extra is asked for).
_hash=$(cat "$POSE_ROOT/setup.py" | sha1sum | cut -c1-12)
_stamp="$POSE_VENV/.pose-installed-${_hash}-${_extra:-base}"
if [ ! -f "$_stamp" ]; then
  echo "[env] installing pose_megatron${_extra:+[$_extra]} into $POSE_VENV"
  "$POSE_VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  if [ "$_has_cuda" = 0 ]; then
    "$POSE_VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  fi
  "$POSE_VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -e "$POSE_ROOT${_extra:+[$_extra]}"
  touch "$_stamp"
fi
export PATH="$POSE_VENV/bin:$PATH"
