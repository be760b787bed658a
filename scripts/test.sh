#!/usr/bin/env bash
# The test suite (README's second command): sets up .venv, then runs pytest. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" test
cd "$POSE_ROOT"
exec python -m pytest "$@"
