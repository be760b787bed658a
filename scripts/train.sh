#!/usr/bin/env bash
# The main job (README's first command): sets up .venv, then runs the PoSE launch script.
# With no arguments and no GPU it trains a tiny LLaMA on the bundled sample corpus on CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec bash "$POSE_ROOT/examples/pretrain_pose_llama.sh" "$@"
