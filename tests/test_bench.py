"""The extraction benchmark end to end at toy size: every method runs and every figure is reported.

Speed itself is never asserted here (machines are noisy); benchmarks/RESULTS.md holds the figures.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "extract_bench.py"


@pytest.mark.slow
def test_benchmark_reports_every_method_and_figure(tmp_path, tiny_bert):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier figures\n")
    args = ["--texts", "24", "--repeats", "1", "--probe-texts", "60", "--probe-every", "1"]
    models = ["--decoder", "tiny-llama-shape", "--encoder", str(tiny_bert)]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, *models, "--results", str(results)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# earlier figures\n")  # appended, not overwritten
    rows = [r.strip("| ").split(" | ") for r in text.splitlines() if r.startswith("| ")]
    methods = [r[0] for r in rows if len(r) == 10]
    decoder = ["reference", "llmembed float32", "llmembed bfloat16"]
    peers = ["sentence-transformers", "sentence-transformers bf16", "onnxruntime"]
    ours = ["llmembed float32", "llmembed bfloat16", "llmembed bfloat16, last layer, mean"]
    assert methods == ["method", *decoder, "reference", *peers, *ours]
    enc = [r for r in rows if len(r) == 10 and r[0] in peers]
    assert sorted(r[6] for r in enc)[-1] == "1.00x"  # the fastest peer is the yardstick
    assert all(r[5] == "1.00x" for r in rows if r[0] == "reference")
    assert re.search(r"llmembed \(all layers\) is [\d.]+x the fastest peer \(", text)
    assert "tiny-llama-shape: no peer measured" in text
    inside = re.search(
        r"inside the layers \(default\): 1 stored .* MB, all 3 [\d.]+ MB \(([\d.]+)x", text
    )
    assert inside and float(inside.group(1)) <= 1.2
    assert re.search(r"float32 \d+ GFLOP/s, bfloat16 \d+ GFLOP/s", text)  # measured peaks
    assert re.search(r"peak RSS \d+ MB at 24 texts, \d+ MB at 96 texts", text)
    assert re.search(r"all layers [\d.]+ ms \(ratio [\d.]+; 1/L = 0.333\)", text)
    assert re.search(r"sweep over all 3 layers .* [\d.]+ s, against [\d.]+ s", text)
    cos = [float(x) for x in re.findall(r"cosine median ([\d.]+)", text)]
    assert len(cos) == 4 and all(0.99 < c <= 1.0 + 1e-9 for c in cos)
    probe = next(r for r in text.splitlines() if r.startswith("| bfloat16 |"))
    assert all(0 <= float(x) <= 100 for x in probe.strip("| ").split(" | ")[1:])


GPU_BENCH = BENCH.parent / "gpu_bench.py"


@pytest.mark.slow
def test_gpu_benchmark_runs_every_method_at_toy_size_on_a_cpu(tmp_path, tiny_llama, tiny_bert):
    """`DEV=cpu` runs the GPU benchmark's whole code path on toy shapes: the hand-written loop, with
    and without its save, llmembed (all layers and one), sentence-transformers on the encoder, the
    shared-node checks (two jobs at once, two processes under accelerate)."""
    import json
    import os
    import shutil

    from tests.conftest import sentences

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    texts = [t for t, _ in sentences(48)]
    for name in ("mr", "bbc"):
        (inputs / f"{name}.json").write_text(json.dumps(texts))
    for role, model in (("decoder", tiny_llama), ("encoder", tiny_bert)):
        shutil.copytree(model, inputs / f"{role}-tokenizer")
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(GPU_BENCH), "run", str(inputs), "--results", str(results)],
        capture_output=True,
        text=True,
        env={**os.environ, "DEV": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    rows = [r.strip("| ").split(" | ") for r in text.splitlines() if r.startswith("| ")]
    methods = {(r[0], r[1], r[2]) for r in rows[1:]}
    for role in ("decoder", "encoder"):
        for data in ("mr", "bbc"):
            for method in ("loop", "loop, np.save and sync", "llmembed, all layers",
                           "llmembed, last layer"):  # fmt: skip
                assert (role, data, method) in methods
        assert (role, "mr", "sentence-transformers bf16") in methods or role == "decoder"
    assert re.search(
        r"decoder mr: llmembed \(all layers\) [\d.]+x the loop, [\d.]+x the loop", text
    )
    assert re.search(r"bfloat16 matmul peak measured in this run: [\d.]+ TFLOP/s", text)
    # The shared-node checks: two jobs at once both finish; two processes store what one does
    # (on a CPU a gloo group of two, bitwise as in one process).
    jobs = re.findall(r"two jobs at once, job \d: ([\d.]+) s, ([\d.]+) of one job", text)
    assert len(jobs) == 2 and "FAILED" not in text
    assert (
        "decoder mr: accelerate, 2 processes on one GPU against one process: stored values "
        "bitwise equal" in text
    )


PADDING_BENCH = BENCH.parent / "padding_bench.py"


@pytest.mark.slow
def test_padding_benchmark_times_each_cap_with_the_batches_it_made(tmp_path, tiny_bert):
    """Each cap's row reports the batches its run made (from the manifest): no cap makes fewer,
    fuller batches than a 5% cap, so the benchmark's cap really reached the extraction."""
    results = tmp_path / "RESULTS.md"
    args = ["--models", str(tiny_bert), "--dtypes", "float32", "--texts", "64", "--rounds", "2"]
    args += ["--caps", "0.05", "1", "--budgets", "256", "--results", str(results)]
    proc = subprocess.run(
        [sys.executable, str(PADDING_BENCH), *args], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        r.strip("| ").split(" | ") for r in results.read_text().splitlines() if r.startswith("| ")
    ]
    assert rows[0][:4] == ["model", "dtype", "token budget", "padding cap"]
    capped, uncapped = rows[1:]
    assert (capped[3], uncapped[3]) == ("0.05", "1")
    batches = [int(re.match(r"(\d+) batches", r[4]).group(1)) for r in (capped, uncapped)]
    padding = [float(re.search(r"([\d.]+)x padding", r[4]).group(1)) for r in (capped, uncapped)]
    assert batches[1] < batches[0] and padding[0] <= 1.05 < padding[1]
    assert capped[7] == "1.000x"  # speeds are ratios against the first setting
    assert re.search(r"matmul peak before / after: \d+ / \d+ GFLOP/s", results.read_text())


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (BENCH, ["--decoder", "nosuch"], "'nosuch' is neither a backbone conf"),
        (PADDING_BENCH, ["--models", "/no/such/model"], "'/no/such/model' is neither a backbone"),
        (PADDING_BENCH, ["--caps", "0.05", "1.5"], "--caps are shares of a batch's padded tokens"),
    ],
)
def test_benchmarks_refuse_a_bad_model_or_cap_before_any_work(script, args, message):
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"{script.name}: error: ") and message in last
