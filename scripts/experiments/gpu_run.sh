#!/bin/bash
# The GPU run of docs/RESULTS.md (an NVIDIA H200 there): experiment 4 on every set and the GPU
# figures of experiment 5, on a machine with one NVIDIA GPU, llmembed's packages and the packaged
# models and data installed:
#
#   bash scripts/experiments/gpu_run.sh OUT_DIR
#   .venv/bin/python -m scripts.experiments.merge OUT_DIR/mr OUT_DIR/bbc OUT_DIR/trec --into docs/results/gpu
#   cp OUT_DIR/extraction.json docs/results/gpu/
#
# One job at a time, so that each meter (seconds, NVML joules) reads its own work: llmembed's
# extraction of MR with both backbones (the cache manifests keep the figures), then the
# counterparts on MR, BBC and TREC.
# Environment: PYTHON (default python3), DEADLINE (seconds for the whole run, default none: a
# job still running then is stopped as by Ctrl-C and what it had not written is left out), EXTRA
# and EXTRA_EXTRACT (Hydra overrides, split on spaces, for a dry run: "dataset.limit=60").
set -u
[ $# -eq 1 ] || { echo "usage: bash scripts/experiments/gpu_run.sh OUT_DIR" >&2; exit 2; }
R=$1; PY=${PYTHON:-python3}; X=scripts.experiments
T0=$SECONDS; DEADLINE=${DEADLINE:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
mkdir -p "$R" && : > "$R"/jobs.txt
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > "$R"/gpu.txt 2>&1
job() {  # job NAME COMMAND...: its log in OUT_DIR/NAME.log, its start, end and status in jobs.txt
  local name=$1 limit=() left; shift
  if [ "$DEADLINE" -gt 0 ]; then
    left=$((DEADLINE - (SECONDS - T0) - 20))  # 20 s for the Ctrl-C to be heard before the kill
    if [ "$left" -le 0 ]; then echo "$name skipped: deadline" >> "$R"/jobs.txt; return; fi
    limit=(timeout -s INT -k 20 "$left")
  fi
  echo "$name start $((SECONDS - T0)) s" >> "$R"/jobs.txt
  ${limit[@]+"${limit[@]}"} "$@" > "$R/$name.log" 2>&1
  echo "$name rc=$? end $((SECONDS - T0)) s" >> "$R"/jobs.txt
}
for b in smollm2 minilm; do
  job extract_mr_$b $PY -m llmembed.extract.cli dataset=mr backbone=$b extract.progress=false ${EXTRA_EXTRACT:-}
done
# Every split of every fine-tuning setup (the committed config's per-set splits fit a 2-core CPU),
# in whole batches (the CPU's micro-batches save memory a GPU has); fine-tuning records in OUT_DIR,
# so a stopped run resumes and no CPU record of the same settings is taken for the GPU's.
for d in mr bbc trec; do
  job counterparts_$d $PY -m $X.counterparts "results.datasets=[$d]" results.out_dir="$R"/$d \
    results.run_dir="$R"/runs results.counterparts.torch_threads=4 \
    results.counterparts.finetuning.setups.minilm.splits=null \
    results.counterparts.finetuning.setups.minilm.micro_batch=null \
    results.counterparts.finetuning.setups.smollm2_lora.splits=null \
    results.counterparts.finetuning.setups.smollm2_lora.micro_batch=null ${EXTRA:-}
done
# The extraction records of the cache entries (seconds, joules, device), for experiment 5.
$PY - "$R"/extraction.json <<'PY'
import json, os, sys
from pathlib import Path
root = Path(os.environ.get("LLMEMBED_CACHE", "~/.cache/llmembed")).expanduser()
out = {}
for m in sorted(root.glob("*/sel-*/manifest.json")):
    d = json.loads(m.read_text())
    out.setdefault(d["backbone"]["name"], []).extend(d["extractions"])
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
PY
cat "$R"/jobs.txt
