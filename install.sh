#!/usr/bin/env bash
# Idempotent install of arenaflow and its pinned stack into .venv/ at the repo root.
#   ./install.sh          the pipeline (about 3 minutes on a fresh machine, 4-5 GB)
#   ./install.sh --test   also what the tests need: Debian's headless Chromium for the MLflow UI test
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.arenaflow-installed
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside CPU torch they break `import vllm`.
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "--test" ]; then
  .ci/install-browser.sh
fi
