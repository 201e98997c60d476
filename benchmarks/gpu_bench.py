"""Extraction on a GPU, like for like: llmembed against a hand-written transformers loop and
sentence-transformers, on short texts (MR) and long ones (BBC, max_length 512).

    # here: the inputs (texts as JSON, the two tokenizers), so that the GPU machine needs only the
    # llmembed wheel and this folder (no data or model packages)
    .venv/bin/python benchmarks/gpu_bench.py prepare bench-inputs
    # on the GPU machine
    python benchmarks/gpu_bench.py run bench-inputs --results benchmarks/RESULTS.md
    # the same code at toy size on a CPU (the test suite runs this)
    DEV=cpu python benchmarks/gpu_bench.py run bench-inputs --results /tmp/RESULTS.md

Models are built from a config with random weights (speed does not depend on the weights) in
bfloat16 and saved once to a temporary folder: a decoder of Llama-2-7B's shape (32 x 4096) with
SmolLM2's tokenizer, and an encoder of MiniLM's shape (6 x 384) with its own. Each method runs in a
process of its own (peak GPU memory and host RSS are per process), model loading untimed:

- `loop`: what a competent user writes by hand: texts sorted by length into batches of 16,384
  padded tokens, `output_hidden_states=True`, masked mean / last / first of every hidden state on
  the GPU, float16 to the host; timed to the last row on the host, and again with `np.save` of the
  result and `os.sync` (what a stored result costs).
- `llmembed`: `extract_texts` into a fresh cache, every layer and one layer (the last, mean), the
  same poolings; timed from the call to the committed entry, model loading excluded.
- `sentence-transformers` (encoder only): `encode` with bfloat16 weights at its best batch size.

A shared GPU node, with the decoder on MR: two llmembed jobs started together on the one GPU (both
must finish; each one's throughput against one job alone), and `accelerate launch --num_processes 2`
on the one GPU against one process through the CLI (the stored values compared).

Figures: seconds, tokens/s, MFU (model FLOPs of real tokens against the bfloat16 matmul peak
measured in the same run), forward calls, padded tokens, peak GPU memory, peak host RSS; ratios
only within this run. A dated section goes to `--results`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from extract_bench import machine, matmul_peak, useful_flops  # noqa: E402

CPU = os.environ.get("DEV") == "cpu"  # toy shapes and few texts, to test this script on a CPU
DEVICE = "cpu" if CPU else "cuda"
DECODER = (
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if CPU
    else dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
)
ENCODER = (
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if CPU
    else dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)
)
TEXTS = 48 if CPU else None  # texts per data set (None: all)
LOOP_BUDGET = 16384  # the hand-written loop's padded tokens per batch
MAX_LENGTH = 512


# ------------------------------------------------------------------------------------- inputs
def prepare(out: Path) -> None:
    """Texts of the packaged MR and BBC sets, SmolLM2's and MiniLM's tokenizers, into `out`."""
    from hydra import compose, initialize_config_module

    from llmembed.data.datasets import dataset_texts
    from llmembed.extract.backbones import inspect_backbone, load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    with initialize_config_module("llmembed.conf", version_base=None):
        for name in ("mr", "bbc"):
            _, texts = dataset_texts(compose("extract", [f"dataset={name}"]).dataset)
            (out / f"{name}.json").write_text(json.dumps(texts))
        for role, backbone in (("decoder", "smollm2"), ("encoder", "minilm")):
            bb = compose("extract", [f"backbone={backbone}"]).backbone
            load_tokenizer(bb, inspect_backbone(bb, None)).save_pretrained(
                out / f"{role}-tokenizer"
            )


def build(role: str, inputs: Path, folder: Path) -> Path:
    """A model of the role's shape, random weights, bfloat16, with its tokenizer, saved to `folder`."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel

    tok = AutoTokenizer.from_pretrained(inputs / f"{role}-tokenizer")
    torch.manual_seed(0)
    if role == "decoder":
        config = LlamaConfig(**DECODER, vocab_size=len(tok), max_position_embeddings=4096)
        kind = LlamaModel
    else:
        config = BertConfig(**ENCODER, vocab_size=len(tok), max_position_embeddings=512)
        kind = BertModel
    with torch.device(DEVICE):
        model = kind(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def facts(folder: Path, causal: bool) -> dict:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        body = AutoModel.from_config(config)
    params = sum(p.numel() for n, p in body.named_parameters() if "embed" not in n)
    return {
        "body_params": params,
        "num_layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "causal": causal,
    }


# ------------------------------------------------------------------------------------- methods
def peaks() -> dict:
    gpu = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_gpu_mb": gpu, "rss_mb": rss}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_loop(folder: Path, texts: list[str], poolings: list[str], save_to: Path) -> dict:
    """The hand-written loop (see the module docstring)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModel.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE).eval()
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    sync()
    start = time.perf_counter()
    out, calls, padded, i = [], 0, 0, 0
    with torch.inference_mode():
        while i < len(order):
            rows = order[i : i + max(1, LOOP_BUDGET // lengths[order[i]])]
            enc = tok([texts[r] for r in rows], padding=True, truncation=True,
                      max_length=MAX_LENGTH, return_tensors="pt").to(DEVICE)  # fmt: skip
            hidden = model(**enc, output_hidden_states=True).hidden_states
            mask = enc["attention_mask"]
            n = mask.sum(1)  # (B,)
            at = torch.arange(len(rows), device=DEVICE)
            pooled = []
            for h in hidden:  # (B, T, H)
                per = {
                    "mean": (h * mask[:, :, None]).float().sum(1) / n[:, None],
                    "last": h[at, n - 1].float(),
                    "first": h[:, 0].float(),
                }
                pooled.append(torch.stack([per[p] for p in poolings], 1))  # (B, P, H)
            out.append(torch.stack(pooled, 1).half().cpu())  # (B, layers, P, H)
            calls, padded, i = calls + 1, padded + mask.numel(), i + len(rows)
        result = torch.cat(out).numpy()
    seconds = time.perf_counter() - start
    np.save(save_to, result)
    os.sync()
    with_save = time.perf_counter() - start
    save_to.unlink()
    return {"seconds": seconds, "with_save": with_save, "forward_calls": calls,
            "padded_tokens": padded, "tokens": sum(lengths), "bytes": result.nbytes, **peaks()}  # fmt: skip


def run_llmembed(folder: Path, texts: list[str], poolings: list[str], layers: str, root: Path):
    from hydra import compose, initialize_config_module

    from llmembed.extract.pipeline import extract_texts
    from llmembed.extract.plan import plan_from_config

    overrides = [
        "backbone=local",
        f"backbone.path={folder}",
        f"backbone.name={folder.name}",
        f"cache.root={root}",
        f"extract.poolings=[{','.join(poolings)}]",
        f"extract.layers={'all' if layers == 'all' else '[-1]'}",
        f"extract.max_length={MAX_LENGTH}",
        "extract.progress=false",
        "extract.dtype=bfloat16",
    ]
    with initialize_config_module("llmembed.conf", version_base=None):
        plan = plan_from_config(compose("extract", overrides))
    start = time.perf_counter()
    res = extract_texts(plan, texts, name="bench")
    wall = time.perf_counter() - start - res.stats.load_seconds
    s = res.stats
    return {"seconds": wall, "stream_seconds": s.seconds, "forward_calls": s.forward_calls,
            "padded_tokens": s.padded_tokens, "tokens": s.tokens,
            "bytes": res.entry.size_bytes(), **peaks()}  # fmt: skip


def run_sentence_transformers(folder: Path, texts: list[str]) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device=DEVICE, model_kwargs={"dtype": torch.bfloat16})
    model.max_seq_length = MAX_LENGTH
    best = None
    for batch in (32, 64, 128, 256, 512, 1024):
        model.encode(texts[:batch], batch_size=batch)  # warm
        sync()
        start = time.perf_counter()
        model.encode(texts, batch_size=batch, convert_to_numpy=True)
        sync()
        seconds = time.perf_counter() - start
        if best is None or seconds < best["seconds"]:
            best = {"seconds": seconds, "batch_size": batch}
    return {**best, **peaks()}


def child(args) -> None:
    texts = json.loads(Path(args.texts).read_text())[:TEXTS]
    folder, poolings = Path(args.folder), args.poolings.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if args.method == "loop":
            res = run_loop(folder, texts, poolings, Path(tmp) / "out.npy")
        elif args.method == "llmembed":
            res = run_llmembed(folder, texts, poolings, args.layers, Path(tmp) / "cache")
        else:
            res = run_sentence_transformers(folder, texts)
    print("RESULT " + json.dumps(res))


def child_command(method: str, folder: Path, texts: Path, poolings: list[str], layers: str = "all"):
    return [sys.executable, __file__, "child", method, str(folder), str(texts),
            "--poolings", ",".join(poolings), "--layers", layers]  # fmt: skip


def child_result(stdout: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def measure(method: str, folder: Path, texts: Path, poolings: list[str], layers: str = "all"):
    proc = subprocess.run(child_command(method, folder, texts, poolings, layers),
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{method} on {texts.name} failed:\n{proc.stderr[-3000:]}")
    return child_result(proc.stdout)


# ------------------------------------------------------------------------------ a shared GPU node
def two_jobs(folder: Path, texts: Path, poolings: list[str], alone: dict) -> list[str]:
    """Two extraction jobs started together on the one GPU (each `token_budget: auto`, sized from
    the memory free when it loads): both must finish, each near half of one job's throughput."""
    cmd = child_command("llmembed", folder, texts, poolings)
    jobs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    notes = []
    for i, job in enumerate(jobs, 1):
        out, err = job.communicate()
        if job.returncode != 0:
            last = (err.strip().splitlines() or ["no message"])[-1]
            notes.append(f"two jobs at once, job {i}: FAILED (exit {job.returncode}): {last}")
            continue
        r = child_result(out)
        gpu = f", peak GPU {r['peak_gpu_mb']:.0f} MB" if r.get("peak_gpu_mb") else ""
        notes.append(
            f"two jobs at once, job {i}: {r['seconds']:.2f} s, "
            f"{alone['seconds'] / r['seconds']:.2f} of one job's throughput alone "
            f"(0.50 is a fair half){gpu}"
        )
    return notes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(folder: Path, texts: Path, poolings: list[str], work: Path) -> str:
    """`accelerate launch --num_processes 2` on the one GPU against one process, through the CLI
    on a data file: the stored values of the two entries compared."""
    from llmembed.cache.root import Cache

    data = work / "texts.jsonl"
    rows = json.loads(texts.read_text())[:TEXTS]
    data.write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t in rows))
    bin_dir = Path(sys.executable).parent

    def overrides(root: Path) -> list[str]:
        return ["backbone=local", f"backbone.path={folder}", f"backbone.name={folder.name}",
                "dataset=file", f"dataset.path={data}", f"cache.root={root}",
                f"extract.poolings=[{','.join(poolings)}]", "extract.layers=all",
                f"extract.max_length={MAX_LENGTH}", "extract.dtype=bfloat16",
                "extract.progress=false"]  # fmt: skip

    launch = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "llmembed.extract"]  # fmt: skip
    runs = {
        "one": [sys.executable, "-m", "llmembed.extract", *overrides(work / "one")],
        "two": [*launch, *overrides(work / "two")],
    }
    # On a CPU, bitwise equality needs the same threads per process (README, Scaling out).
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if CPU else None
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            return f"accelerate, 2 processes on one GPU: {name} FAILED: {last}"
    (one,), (two,) = Cache(work / "one").entries(), Cache(work / "two").entries()
    worst, lowest = 0.0, 1.0
    for pooling in poolings:
        a = one.read(pooling, one.manifest.layers).astype(np.float64)
        b = two.read(pooling, two.manifest.layers).astype(np.float64)
        worst = max(worst, float(np.abs(a - b).max()))
        cos = (a * b).sum(-1) / np.maximum(
            np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30
        )
        lowest = min(lowest, float(cos.min()))
    same = (
        "bitwise equal"
        if worst == 0
        else f"largest difference {worst:.3g}, lowest cosine {lowest:.6f}"
    )
    procs = two.manifest.extractions[-1].get("processes")
    return f"accelerate, {procs} processes on one GPU against one process: stored values {same}"


# ------------------------------------------------------------------------------------- report
def run(inputs: Path, results: Path) -> None:
    peak = matmul_peak(torch.bfloat16, DEVICE) * 1e9  # FLOP/s
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for role in ("decoder", "encoder"):
            folder = build(role, inputs, Path(tmp) / f"{role}-shape")
            f = facts(folder, causal=role == "decoder")
            poolings = _poolings(folder, role)
            notes.append(f"{role}: {f['num_layers']} x {f['hidden']}, poolings {poolings}")
            for data in ("mr", "bbc"):
                texts = inputs / f"{data}.json"
                lengths = _lengths(folder, texts)
                flops = useful_flops(f, lengths)
                res = {
                    "loop": measure("loop", folder, texts, poolings),
                    "llmembed, all layers": measure("llmembed", folder, texts, poolings),
                    "llmembed, last layer": measure("llmembed", folder, texts, poolings, "last"),
                }
                if role == "encoder":
                    res["sentence-transformers bf16"] = measure("st", folder, texts, poolings)
                loop = res["loop"]
                for name, r in res.items():
                    rows.append(_row(role, data, name, r, sum(lengths), flops, peak, loop))
                saved = {**loop, "seconds": loop["with_save"]}
                rows.append(
                    _row(
                        role, data, "loop, np.save and sync", saved, sum(lengths), flops, peak, loop
                    )
                )
                ours, one = res["llmembed, all layers"], res["llmembed, last layer"]
                notes.append(
                    f"{role} {data}: llmembed (all layers) {loop['seconds'] / ours['seconds']:.2f}x "
                    f"the loop, {loop['with_save'] / ours['seconds']:.2f}x the loop with its save; "
                    f"all layers take {ours['seconds'] / one['seconds']:.2f}x one layer"
                )
                if role == "decoder" and data == "mr":
                    notes += [
                        f"{role} {data}: {n}" for n in two_jobs(folder, texts, poolings, ours)
                    ]
                    notes.append(
                        f"{role} {data}: " + two_processes(folder, texts, poolings, Path(tmp))
                    )
    section = _section(rows, notes, peak)
    print(section)
    with open(results, "a") as f:
        f.write("\n" + section)


def _poolings(folder: Path, role: str) -> list[str]:
    """mean, last, first, as the issue's loop pools; a decoder whose tokenizer puts the same token
    first (BOS) has no meaningful `first`, which llmembed refuses: then mean and last for both."""
    from transformers import AutoTokenizer

    from llmembed.extract.backbones import adds_fixed_first_token

    tok = AutoTokenizer.from_pretrained(folder)
    fixed = role == "decoder" and adds_fixed_first_token(tok)
    return ["mean", "last"] if fixed else ["mean", "last", "first"]


def _lengths(folder: Path, texts: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    data = json.loads(texts.read_text())[:TEXTS]
    return [len(x) for x in tok(data, truncation=True, max_length=MAX_LENGTH)["input_ids"]]


def _row(role, data, name, r, tokens, flops, peak, loop) -> list[str]:
    def mb(x):
        return "-" if x is None else f"{x:.0f}"

    return [role, data, name, f"{r['seconds']:.2f}", f"{tokens / r['seconds']:.0f}",
            f"{flops / r['seconds'] / peak:.1%}", f"{loop['seconds'] / r['seconds']:.2f}x",
            str(r.get("forward_calls", "-")), str(r.get("padded_tokens", "-")),
            mb(r.get("peak_gpu_mb")), mb(r.get("rss_mb"))]  # fmt: skip


def _section(rows, notes, peak) -> str:
    head = ["model", "data", "method", "s", "tokens/s", "MFU", "vs loop", "forward calls",
            "padded tokens", "peak GPU MB", "peak RSS MB"]  # fmt: skip
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')}: GPU extraction, like for like"
        + (" (DEV=cpu toy run)" if CPU else ""),
        "",
        f"Machine: {machine(DEVICE)}; bfloat16 matmul peak measured in this run: "
        f"{peak / 1e12:.1f} TFLOP/s. Command: `python benchmarks/gpu_bench.py run ...`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        *(f"- {n}" for n in notes),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    r = sub.add_parser("run")
    r.add_argument("inputs", type=Path)
    r.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    c = sub.add_parser("child")
    c.add_argument("method", choices=["loop", "llmembed", "st"])
    c.add_argument("folder")
    c.add_argument("texts")
    c.add_argument("--poolings", default="mean,last,first")
    c.add_argument("--layers", default="all")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    elif args.command == "run":
        run(args.inputs, args.results)
    else:
        child(args)


if __name__ == "__main__":
    main()
