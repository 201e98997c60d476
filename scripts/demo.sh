#!/usr/bin/env bash
# The main job on the packaged demo data: set up (idempotent), embed 3,000 real MR movie-review
# sentences with SmolLM2-135M and MiniLM into the cache, then list the cache.
#   bash scripts/demo.sh                   # about 3 minutes on 2 CPU cores; seconds when cached
#   bash scripts/demo.sh dataset.limit=null   # the full 10,568 sentences (overrides go to Hydra)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export LLMEMBED_CACHE=${LLMEMBED_CACHE:-$PWD/.llmembed-cache}
.venv/bin/llmembed-extract -m dataset=mr dataset.limit=3000 backbone=smollm2,minilm "$@"
.venv/bin/llmembed-cache ls
