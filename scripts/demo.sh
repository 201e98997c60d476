#!/usr/bin/env bash
# The whole LLMEmbed pipeline on the packaged demo data, set-up included (idempotent): extract
# SmolLM2-135M and MiniLM over 4,000 real MR sentences, sweep every layer, train logreg and the
# paper's head on the best layer and on fused features, print the results (see scripts/demo.py).
#   bash scripts/demo.sh                      # about 2 minutes on 2 CPU cores; under a minute when cached
#   bash scripts/demo.sh dataset.limit=null   # all 10,566 sentences (overrides apply to every step)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export LLMEMBED_CACHE=${LLMEMBED_CACHE:-$PWD/.llmembed-cache}
.venv/bin/python scripts/demo.py "$@"
