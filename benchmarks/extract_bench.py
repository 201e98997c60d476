"""Extraction speed and memory: llmembed against the paper's reference recipe and sentence-transformers.

    bash scripts/setup.sh && .venv/bin/python benchmarks/extract_bench.py       # CPU, about 15 min
    .venv/bin/python benchmarks/extract_bench.py --device cuda --decoder llama2-7b-shape  # one GPU

The same MR texts go through every method, each method in a process of its own (peak RSS is a
per-process figure), `--repeats` times; tables give medians, and ratios only ever compare figures of
this one run. Model loading is not timed; llmembed's writes to the cache are. A dated section is
appended to benchmarks/RESULTS.md (`--results`).

Methods: `reference` is the recipe of the paper's code, written here as the baseline (every batch of
32 padded to 128 tokens, the causal-LM class with its LM head, all hidden states, mean over all
positions padding included, float32); `llmembed` is `extract()` into a fresh cache, in float32 and
bfloat16, every layer and pooling (and, on the encoder, one layer with mean pooling).

Peers, each at its best documented setting (one vector per text, load and export untimed):
`sentence-transformers` `encode` in float32 and with bfloat16 weights (`model_kwargs={"torch_dtype":
torch.bfloat16}`) on the encoder; `onnxruntime` float32 (the encoder exported with `torch.onnx`, all
graph optimizations, mean pooling and normalizing as sentence-transformers does; ONNX Runtime has no
bfloat16 CPU kernels for these ops); `llama.cpp` (llama-cpp-python's embedding mode on the packaged
GGUF, its own quantized weights, mean pooling, every core) on a GGUF decoder where llama-cpp-python is
installed. A line per model gives llmembed (all layers) against the fastest peer.

Also measured: peak activation memory (tensors alive at once, `benchmarks/activation_memory.py`) of
one forward batch at the default token budget, storing 1 layer against all layers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/activation_memory.py, when run as a script

# Llama-2-7B's shape (its config.json), built with random weights: no download needed.
SHAPES = {
    "llama2-7b-shape": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
    },
    # The same code path at toy size, for the test suite.
    "tiny-llama-shape": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
}
# The peers, each one vector per text at its best documented setting (see the module docstring).
PEERS = ("sentence-transformers", "sentence-transformers bf16", "onnxruntime", "llama.cpp")
# Dense bfloat16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity).
GPU_BF16_PEAK = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


# ---------------------------------------------------------------- configs shared by the processes


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("llmembed.conf", version_base=None):
        return hydra_compose(name, overrides=overrides)


def backbone_overrides(model: str) -> list[str]:
    """A backbone conf name (smollm2, minilm) or a model folder."""
    if Path(model).exists():
        return ["backbone=local", f"backbone.path={model}", f"backbone.name={Path(model).name}"]
    return [f"backbone={model}"]


def refuse_unknown_models(parser: argparse.ArgumentParser, models: list[str]) -> None:
    """One usage error, before any work, for a model that is neither a backbone conf nor a folder."""
    from hydra.errors import HydraException

    for model in models:
        try:
            compose("extract", backbone_overrides(model))
        except HydraException:
            parser.error(
                f"{model!r} is neither a backbone conf (smollm2, minilm, ...) nor a folder"
            )


def dataset_overrides(n: int) -> list[str]:
    return ["dataset=mr", f"dataset.limit={n}"]


def load_texts(n: int) -> list[str]:
    from llmembed.data.datasets import load_dataset

    return load_dataset(compose("extract", dataset_overrides(n)).dataset).texts


def model_facts(model: str) -> dict:
    """Parameter count of the transformer body (no embeddings, no LM head), from the config alone."""
    from transformers import AutoConfig, AutoModel

    from llmembed.extract.backbones import inspect_backbone

    info = inspect_backbone(compose("extract", backbone_overrides(model)).backbone, None)
    config = AutoConfig.from_pretrained(
        info.source.location, **info.source.load_kwargs(None, False)
    )
    with torch.device("meta"):
        body = AutoModel.from_config(config)
    return {
        "body_params": sum(p.numel() for n, p in body.named_parameters() if "embed" not in n),
        "num_layers": info.num_layers,
        "hidden": info.hidden_size,
        "causal": "pooler" not in info.poolings,  # our encoders (BERT family) have a pooler
    }


def useful_flops(facts: dict, lengths: list[int]) -> float:
    """Model FLOPs of one pass over real tokens only: 2 x body parameters per token, plus attention
    scores and mixing (2 x 2 x T x hidden per token and layer; half of it under a causal mask)."""
    t = np.asarray(lengths, dtype=np.float64)
    attention = (
        (2.0 if facts["causal"] else 4.0) * facts["num_layers"] * facts["hidden"] * (t**2).sum()
    )
    return 2.0 * facts["body_params"] * t.sum() + attention


def token_lengths(model: str, texts: list[str], max_length: int = 512) -> list[int]:
    from llmembed.extract.backbones import inspect_backbone, load_tokenizer

    bb = compose("extract", backbone_overrides(model)).backbone
    tok = load_tokenizer(bb, inspect_backbone(bb, None))
    return [len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"]]


def matmul_peak(dtype: torch.dtype, device: str, repeats: int = 5) -> float:
    """GFLOP/s of a large square matmul: the machine's practical ceiling for this dtype."""
    n = 8192 if device.startswith("cuda") else 2048
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync()
        times.append((time.perf_counter() - t) / 5)
    return 2 * n**3 / statistics.median(times) / 1e9


# ------------------------------------------------------------------- one method, in its own process


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reference(model: str, texts: list[str], repeats: int, device: str) -> dict:
    """The paper's recipe: fixed padding to 128, LM head kept, mean over padding too, fp32."""
    from transformers import AutoModel, AutoModelForCausalLM

    from llmembed.extract.backbones import inspect_backbone, load_tokenizer

    bb = compose("extract", backbone_overrides(model)).backbone
    info = inspect_backbone(bb, None)
    tok = load_tokenizer(bb, info)
    kw = info.source.load_kwargs(None, False)
    cls = AutoModel if "pooler" in info.poolings else AutoModelForCausalLM
    net = cls.from_pretrained(info.source.location, dtype=torch.float32, **kw).to(device).eval()
    seconds, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        chunks = []
        with torch.no_grad():
            for i in range(0, len(texts), 32):
                enc = tok(
                    texts[i : i + 32],
                    padding="max_length",
                    truncation=True,
                    max_length=min(128, info.max_positions or 128),
                    return_tensors="pt",
                ).to(device)
                hidden = net(**enc, output_hidden_states=True).hidden_states
                chunks.append(torch.stack([h.mean(dim=1) for h in hidden], 1).float().cpu())
        out = torch.cat(chunks).numpy()
        seconds.append(time.perf_counter() - t)
    return {"seconds": seconds, "shape": list(out.shape)}


def run_sentence_transformers(
    model: str, texts: list[str], repeats: int, device: str, dtype: torch.dtype = torch.float32
) -> dict:
    """`SentenceTransformer.encode`, float32 (its default) or with weights in `dtype`."""
    from sentence_transformers import SentenceTransformer

    path = compose("extract", backbone_overrides(model)).backbone.path
    kwargs = {} if dtype == torch.float32 else {"model_kwargs": {"torch_dtype": dtype}}
    st = SentenceTransformer(str(path), device=device, **kwargs)
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = st.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
        seconds.append(time.perf_counter() - t)
    return {"seconds": seconds, "shape": list(out.shape)}


def run_onnxruntime(model: str, texts: list[str], repeats: int, device: str) -> dict:
    """The encoder exported to ONNX (untimed), run by ONNX Runtime with every graph optimization,
    batches of 32 sorted by length as sentence-transformers does, mean pooled and normalized."""
    import onnxruntime as ort
    from transformers import AutoModel

    from llmembed.extract.backbones import inspect_backbone, load_tokenizer

    bb = compose("extract", backbone_overrides(model)).backbone
    info = inspect_backbone(bb, None)
    tok = load_tokenizer(bb, info)
    net = AutoModel.from_pretrained(info.source.location, dtype=torch.float32).eval()
    onnx_file = Path(tempfile.mkdtemp(prefix="llmembed-onnx-")) / "model.onnx"
    sample = tok(["a short text", "a longer text than that one"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    names = [k for k in names if k in sample]
    axes = {k: {0: "batch", 1: "tokens"} for k in names}

    class ByName(torch.nn.Module):  # the exporter passes inputs by position
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, *inputs):
            return self.net(**dict(zip(names, inputs, strict=True))).last_hidden_state

    torch.onnx.export(
        ByName().eval(),
        tuple(sample[k] for k in names),
        str(onnx_file),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "tokens"}},
        opset_version=17,
        dynamo=False,
    )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    order = np.argsort([-len(t) for t in texts], kind="stable")
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = np.empty((len(texts), info.hidden_size), dtype=np.float32)
        for i in range(0, len(texts), 32):
            rows = order[i : i + 32]
            enc = tok([texts[k] for k in rows], padding=True, truncation=True, return_tensors="np")
            hidden = sess.run(None, {k: enc[k].astype(np.int64) for k in names})[0]
            mask = enc["attention_mask"][:, :, None].astype(np.float32)
            mean = (hidden * mask).sum(1) / mask.sum(1)
            out[rows] = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        seconds.append(time.perf_counter() - t)
    shutil.rmtree(onnx_file.parent, ignore_errors=True)
    return {"seconds": seconds, "shape": list(out.shape)}


def gguf_path(model: str) -> Path | None:
    from llmembed.extract.backbones import inspect_backbone

    source = inspect_backbone(compose("extract", backbone_overrides(model)).backbone, None).source
    return Path(source.location) / source.gguf_file if source.kind == "gguf" else None


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def run_llama_cpp(model: str, texts: list[str], repeats: int, device: str) -> dict:
    """llama.cpp's embedding mode on the GGUF file: its quantized weights, mean pooling. Its
    OpenMP threads spin, which on a shared machine can make every core slower than one: the
    thread count (every core or one) that embeds 16 texts faster is used."""
    import llama_cpp

    def load(threads: int):
        return llama_cpp.Llama(
            model_path=str(gguf_path(model)),
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_ctx=2048,
            n_batch=2048,
            n_ubatch=2048,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    trial = {}
    for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
        net = load(threads)
        net.embed(texts[:4])  # warm-up
        t = time.perf_counter()
        net.embed(texts[:16])
        trial[threads] = time.perf_counter() - t
        del net
    threads = min(trial, key=trial.get)
    net = load(threads)
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = np.asarray(net.embed(texts, normalize=False))
        seconds.append(time.perf_counter() - t)
    return {"seconds": seconds, "shape": list(out.shape), "threads": threads}


def run_llmembed(
    model: str, n: int, repeats: int, dtype: str, device: str, keep: Path, extra: str = ""
) -> dict:
    """`extract()` into a fresh cache per repeat: timed from after the model load to the manifest."""
    from llmembed.extract.pipeline import extract

    seconds, loads = [], []
    for r in range(repeats):
        root = keep if r == repeats - 1 else Path(tempfile.mkdtemp(prefix="llmembed-bench-"))
        shutil.rmtree(root, ignore_errors=True)
        cfg = compose(
            "extract",
            [
                *dataset_overrides(n),
                *backbone_overrides(model),
                f"cache.root={root}",
                f"extract.dtype={dtype}",
                f"extract.device={device}",
                "extract.progress=false",
                *(x for x in extra.split(";") if x),
            ],
        )
        res = extract(cfg)
        ex = res.entry.manifest.extractions[-1]
        seconds.append(ex["wall_s"] - ex["load_seconds"])
        loads.append(ex["load_seconds"])
        if root != keep:
            shutil.rmtree(root)
    m = res.entry.manifest
    return {
        "seconds": seconds,
        "load_s": loads,
        "entry": str(res.entry.path),
        "compute_dtype": res.entry.spec.compute_dtype,
        "extraction_wall_s": m.extractions[-1]["wall_s"],
        **{k: m.extractions[-1][k] for k in ("forward_calls", "tokens", "padded_tokens")},
    }


def child(args) -> None:
    texts = json.loads(Path(args.texts_file).read_text())
    peers = {
        "reference": run_reference,
        "sentence-transformers": run_sentence_transformers,
        "sentence-transformers bf16": functools.partial(
            run_sentence_transformers, dtype=torch.bfloat16
        ),
        "onnxruntime": run_onnxruntime,
        "llama.cpp": run_llama_cpp,
    }
    if args.method in peers:
        out = peers[args.method](args.model, texts, args.repeats, args.device)
    else:
        out = run_llmembed(
            args.model,
            len(texts),
            args.repeats,
            args.dtype,
            args.device,
            Path(args.keep),
            args.extra or "",
        )
    out["peak_rss_mb"] = peak_rss_mb()
    out["peak_gpu_mb"] = (
        torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    )
    print("RESULT " + json.dumps(out), flush=True)


def run_child(method: str, model: str, texts_file: Path, repeats: int, device: str, **kw) -> dict:
    """One method in a fresh process of this script (`--child`), so that peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", method, "--model", model, "--texts-file"]
    cmd += [str(texts_file), "--repeats", str(repeats), "--device", device]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{method} on {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------ the measurements


def read_entry(path: str):
    from llmembed.cache.entry import Entry

    return Entry(Path(path))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per (text, layer) of two (rows, layers, hidden) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def probe(model: str, n: int, every: int, device: str) -> dict:
    """5-fold logistic-regression accuracy per layer on float32 and bfloat16 embeddings of the same
    n texts (entries in the default cache, so that a rerun reuses them)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from llmembed.data.datasets import load_dataset
    from llmembed.extract.pipeline import extract

    entries = {}
    for dtype in ("float32", "bfloat16"):
        cfg = compose(
            "extract",
            [
                *dataset_overrides(n),
                *backbone_overrides(model),
                f"extract.dtype={dtype}",
                f"extract.device={device}",
                "extract.progress=false",
            ],
        )
        entries[dtype] = extract(cfg)  # reads the data set's texts, in its order
    layers = list(entries["float32"].entry.manifest.layers)
    picked = sorted({*layers[::every], layers[-1]})
    y = load_dataset(cfg.dataset).labels  # labels belong to the data set, not the cache
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    acc = {}
    for dtype, entry in entries.items():
        x = entry.read("mean", picked).astype(np.float32)
        acc[dtype] = []
        for j in range(len(picked)):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
            acc[dtype].append(float((cross_val_predict(clf, x[:, j], y, cv=folds) == y).mean()))
    cos = cosines(entries["float32"].read("mean", layers), entries["bfloat16"].read("mean", layers))
    return {"texts": n, "layers": picked, "accuracy": acc, "mean_cosine_all": float(cos.mean())}


def read_times(entry_path: str, repeats: int = 5) -> dict:
    entry = read_entry(entry_path)
    layers = list(entry.manifest.layers)

    def timed(sel):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            entry.read("mean", sel)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    one, every = timed([layers[len(layers) // 2]]), timed(layers)
    return {"layers": len(layers), "one_s": one, "all_s": every}


def sweep_time(model: str, n: int, cache_root: Path, device: str) -> dict:
    """A logistic-regression probe on every layer, as `llmembed-classify -m layer=...` runs it."""
    from omegaconf import OmegaConf

    from llmembed.classify.train import train

    bb = compose("extract", backbone_overrides(model)).backbone
    cfg = compose(
        "classify",
        [
            *dataset_overrides(n),
            f"cache.root={cache_root}",
            f"extract.device={device}",
            "save_model=false",
            "extract_missing=false",
        ],
    )
    manifest = next(cache_root.glob("*/*/manifest.json"))
    layers = list(read_entry(str(manifest.parent)).manifest.layers)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for layer in layers:
            source = {"backbone": OmegaConf.to_container(bb, resolve=True), "pooling": "mean"}
            cfg.features.sources = [{**source, "layers": [layer]}]
            train(cfg, Path(out) / f"L{layer}")
    return {"layers": len(layers), "seconds": time.perf_counter() - t}


# ------------------------------------------------------------------------------------- the report


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def data_sheet_peak(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)


def peers_for(role: str, model: str, device: str, notes: list[str]) -> list[str]:
    """The peers that run on this model here; a note says why one is left out."""
    if role == "encoder":
        found = ["sentence-transformers", "sentence-transformers bf16"]
        try:
            import onnxruntime  # noqa: F401

            found.append("onnxruntime")
        except ImportError:
            notes.append(
                "- onnxruntime not installed (pip install 'llmembed[bench]'): not compared"
            )
        return found
    if gguf_path(model) is None or device != "cpu":
        return []
    if not llama_cpp_available():
        notes.append(
            f"- {Path(model).name}: llama-cpp-python is not installed (it compiles llama.cpp; "
            "`pip install llama-cpp-python`): llama.cpp not compared"
        )
        return []
    return ["llama.cpp"]


def row(name, model, res, n, flops, peak, ref_rate, st_rate) -> list[str]:
    sec = statistics.median(res["seconds"])
    rate = n / sec
    gflops = flops / sec / 1e9
    return [
        name,
        model,
        f"{sec:.2f}",
        f"{rate:.1f}",
        f"{res['tokens'] / sec:.0f}",
        f"{rate / ref_rate:.2f}x" if ref_rate else "-",
        f"{rate / st_rate:.2f}x" if st_rate else "-",
        f"{gflops:.0f}",
        f"{100 * gflops / peak:.0f}%",
        f"{res['peak_rss_mb']:.0f}"
        + (f" (GPU {res['peak_gpu_mb']:.0f})" if res.get("peak_gpu_mb") else ""),
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--texts", type=int, default=512, help="MR texts per method (N)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--decoder", default="smollm2", help="conf name, folder, or llama2-7b-shape")
    p.add_argument(
        "--encoder", default="minilm", help="conf name or folder (sentence-transformers)"
    )
    p.add_argument("--probe-texts", type=int, default=4000, help="0 skips the bf16 probe")
    p.add_argument("--probe-every", type=int, default=5, help="probe every k-th layer")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="parts to skip: scaling sweep encoder peers memory reference",
    )
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--texts-file", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--keep", help=argparse.SUPPRESS)
    p.add_argument("--extra", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.method = args.child
        return child(args)
    refuse_unknown_models(p, [m for m in (args.decoder, args.encoder) if m not in SHAPES])

    work = Path(tempfile.mkdtemp(prefix="llmembed-bench-"))
    try:
        report = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report)
    with open(args.results, "a") as f:
        f.write("\n" + report + "\n")
    print(f"appended to {args.results}")


def measure(args, work: Path) -> str:
    started = time.strftime("%Y-%m-%d %H:%M")
    n, dev = args.texts, args.device
    decoder = args.decoder
    if decoder in SHAPES:
        decoder = str(build_shaped(decoder, work / decoder, dev))
    texts = load_texts(n)
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))
    peaks = {d: matmul_peak(getattr(torch, d), dev) for d in ("float32", "bfloat16")}
    models = [("decoder", decoder)] + (
        [] if "encoder" in args.skip else [("encoder", args.encoder)]
    )
    rows, notes, entries = [], [], {}
    for role, model in models:
        facts = model_facts(model)
        lengths = token_lengths(model, texts)
        flops = useful_flops(facts, lengths)
        runs = {}
        if "reference" not in args.skip:
            runs["reference"] = run_child("reference", model, texts_file, args.repeats, dev)
        if "peers" not in args.skip:
            for peer in peers_for(role, model, dev, notes):
                try:
                    runs[peer] = run_child(peer, model, texts_file, args.repeats, dev)
                except RuntimeError as err:
                    notes.append(f"- {Path(model).name}: {peer} failed, not compared ({err})"[:400])
        for dtype in ("float32", "bfloat16"):
            keep = work / f"{role}-{dtype}"
            runs[f"llmembed {dtype}"] = run_child(
                "llmembed", model, texts_file, args.repeats, dev, dtype=dtype, keep=keep
            )
            entries[role, dtype] = runs[f"llmembed {dtype}"]["entry"]
        if role == "encoder":
            runs["llmembed bfloat16, last layer, mean"] = run_child(
                "llmembed",
                model,
                texts_file,
                args.repeats,
                dev,
                dtype="bfloat16",
                keep=work / f"{role}-one",
                extra="extract.layers=[-1];extract.poolings=[mean]",
            )
        rate = {k: n / statistics.median(v["seconds"]) for k, v in runs.items()}
        peer_rates = {k: v for k, v in rate.items() if k in PEERS}
        fastest = max(peer_rates, key=peer_rates.get) if peer_rates else None
        for k, res in runs.items():
            res["tokens"] = sum(lengths)
            dtype = "bfloat16" if "bf" in k or k == "llama.cpp" else "float32"
            rows.append(
                row(
                    k,
                    Path(model).name,
                    res,
                    n,
                    flops,
                    peaks[dtype],
                    rate.get("reference"),
                    peer_rates.get(fastest),
                )
            )
        best = rate["llmembed bfloat16"]
        if fastest:
            notes.append(
                f"- {Path(model).name}: llmembed (all layers) is {best / rate[fastest]:.2f}x the "
                f"fastest peer ({fastest}); bfloat16, all {facts['num_layers'] + 1} layers and "
                f"{'3' if role == 'encoder' else '2'} poolings written to a fresh cache, against "
                "one vector per text"
            )
        else:
            notes.append(f"- {Path(model).name}: no peer measured")
        fp32, bf16 = (read_entry(entries[role, d]) for d in ("float32", "bfloat16"))
        for pooling in ("mean", "last"):
            cos = cosines(
                fp32.read(pooling, fp32.manifest.layers),
                bf16.read(pooling, bf16.manifest.layers),
            )
            per_layer = cos.mean(axis=0)
            notes.append(
                f"- bf16 vs fp32, {Path(model).name} {pooling} pooling: cosine median "
                f"{np.median(cos):.6f}, lowest layer mean {per_layer.min():.5f} (layer "
                f"{int(per_layer.argmin())}), lowest single text {cos.min():.4f}"
            )
        if "reference" in rate:
            speedup = rate["llmembed bfloat16"] / rate["reference"]
            notes.append(
                f"- {Path(model).name}: llmembed bf16 is {speedup:.2f}x the reference recipe"
            )
        if sheet := data_sheet_peak(dev):
            mfu = flops * rate["llmembed bfloat16"] / n / (sheet * 1e12)
            notes.append(
                f"- {Path(model).name}: llmembed bf16 MFU against this card's data-sheet dense bf16 "
                f"peak ({sheet:.0f} TFLOP/s): {100 * mfu:.0f}%"
            )

    lines = [
        f"## {started}: extraction, {n} MR texts, median of {args.repeats}",
        "",
        f"Machine: {machine(dev)}. Matmul peak measured in this run: float32 "
        f"{peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s.",
        f"Command: `{' '.join([Path(sys.executable).name, 'benchmarks/extract_bench.py', *sys.argv[1:]])}`",
        "",
        table(
            [
                "method",
                "model",
                "s",
                "texts/s",
                "tokens/s",
                "vs reference",
                "vs fastest peer",
                "useful GFLOP/s",
                "MFU",
                "peak RSS MB",
            ],
            rows,
        ),
        "",
        *notes,
    ]
    if "memory" not in args.skip:
        lines += activation_memory(decoder, texts, dev, work)
    if "scaling" not in args.skip:
        lines += scaling(args, decoder, work)
    if args.probe_texts:
        pr = probe(decoder, args.probe_texts, args.probe_every, dev)
        diffs = [
            100 * (b - a)
            for a, b in zip(pr["accuracy"]["float32"], pr["accuracy"]["bfloat16"], strict=True)
        ]
        lines += [
            "",
            f"Linear probe (5-fold logistic regression, C=0.05, mean pooling) on {pr['texts']} MR "
            f"texts, {Path(decoder).name}, float32 vs bfloat16 (mean cosine over all layers "
            f"{pr['mean_cosine_all']:.6f}):",
            "",
            table(
                ["layer", *map(str, pr["layers"])],
                [
                    ["float32", *(f"{100 * a:.2f}" for a in pr["accuracy"]["float32"])],
                    ["bfloat16", *(f"{100 * a:.2f}" for a in pr["accuracy"]["bfloat16"])],
                    ["difference (points)", *(f"{d:+.2f}" for d in diffs)],
                ],
            ),
        ]
    return "\n".join(lines)


def scaling(args, decoder: str, work: Path) -> list[str]:
    """Peak RSS at N and 4N texts (default settings), reading one layer against all, and a sweep."""
    n, dev = args.texts, args.device
    big = load_texts(4 * n)
    big_file = work / "texts-4n.json"
    big_file.write_text(json.dumps(big))
    root = work / "decoder-4n"
    at = {
        n: run_child(
            "llmembed", decoder, work / "texts.json", 1, dev, dtype="auto", keep=work / "n"
        ),
        4 * n: run_child("llmembed", decoder, big_file, 1, dev, dtype="auto", keep=root),
    }
    rss = {k: v["peak_rss_mb"] for k, v in at.items()}
    rt = read_times(at[4 * n]["entry"])
    lines = [
        "",
        f"Scaling ({Path(decoder).name}, `extract.dtype=auto` = {at[n]['compute_dtype']}, default "
        "shard size):",
        f"- peak RSS {rss[n]:.0f} MB at {n} texts, {rss[4 * n]:.0f} MB at {4 * n} texts "
        f"({100 * (rss[4 * n] / rss[n] - 1):+.1f}%)",
        f"- reading one layer of {rt['layers']} from the {4 * n}-text entry: {1000 * rt['one_s']:.1f} ms, "
        f"all layers {1000 * rt['all_s']:.1f} ms (ratio {rt['one_s'] / rt['all_s']:.3f}; "
        f"1/L = {1 / rt['layers']:.3f})",
    ]
    if "sweep" not in args.skip:
        sw = sweep_time(decoder, 4 * n, root, dev)
        wall = at[4 * n]["extraction_wall_s"]
        lines.append(
            f"- a logistic-regression sweep over all {sw['layers']} layers (default C grid) on the "
            f"{4 * n}-text entry: {sw['seconds']:.1f} s, against {wall:.1f} s for the extraction "
            f"itself, model load included ({sw['seconds'] / wall:.2f}x)"
        )
    return lines


def activation_memory(model: str, texts: list[str], device: str, cache_root: Path) -> list[str]:
    """Peak activation memory of the first batch (the longest texts, default token budget),
    storing the last layer only against every layer, pooled inside the layers (the default) and
    the old way (every hidden state kept until the batch is pooled). Also the load time of a GGUF
    backbone: de-quantized and converted once, then read from its converted copy."""
    from activation_memory import LiveTensors

    from llmembed.extract.backbones import inspect_backbone, load_model, load_tokenizer
    from llmembed.extract.embedder import Extractor
    from llmembed.extract.plan import resolve_token_budget

    bb = compose("extract", backbone_overrides(model)).backbone
    info = inspect_backbone(bb, None)
    dtype = torch.bfloat16
    loads = []
    for _ in range(2):
        t = time.perf_counter()
        net = load_model(
            bb, info, depth=info.num_layers, dtype=dtype, device=device, cache_root=cache_root
        )
        tok = load_tokenizer(bb, info, cache_root=cache_root)
        loads.append(time.perf_counter() - t)
    budget = resolve_token_budget("auto", device, info)
    order = sorted(texts, key=len, reverse=True)
    peak = {}
    for inside in (True, False):
        for layers in ([info.num_layers], list(range(info.num_layers + 1))):
            ex = Extractor(
                net,
                tok,
                layers=layers,
                poolings=["mean", "last"],
                max_length=512,
                token_budget=budget,
            )
            if not inside:
                ex.tap_last = None
            tokens = ex.tokenize(order)
            width = int(tokens.lengths.max())
            rows = np.arange(min(len(order), max(1, budget // width)))
            ids, mask = (
                torch.from_numpy(a) for a in tokens.padded(rows, "right", tok.pad_token_id)
            )
            batch = rows
            with LiveTensors() as live:
                ex.forward(ids.to(device), mask.to(device))
            peak[inside, len(layers)] = live.peak / 2**20
    name, n_all = Path(model).name, info.num_layers + 1
    lines = [
        "",
        f"Peak activation memory ({name}, bfloat16, one batch of {len(batch)} x {width} tokens at "
        f"the default token budget {budget}, mean and last pooling; tensors alive at once):",
        f"- pooled inside the layers (default): 1 stored layer {peak[True, 1]:.1f} MB, all "
        f"{n_all} {peak[True, n_all]:.1f} MB ({peak[True, n_all] / peak[True, 1]:.2f}x)",
        f"- every hidden state kept until pooled (before): 1 stored layer {peak[False, 1]:.1f} MB, "
        f"all {n_all} {peak[False, n_all]:.1f} MB ({peak[False, n_all] / peak[True, 1]:.2f}x "
        "the default's 1 layer)",
    ]
    if info.source.kind == "gguf":
        lines.append(
            f"- loading {info.source.gguf_file} and its tokenizer: {loads[0]:.1f} s the first time "
            f"(de-quantized and converted), {loads[1]:.1f} s from the converted copy"
        )
    return lines


def build_shaped(name: str, folder: Path, device: str) -> Path:
    """A causal LM of a known shape with random weights and SmolLM2's tokenizer (its vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmembed.extract.backbones import inspect_backbone, load_tokenizer

    bb = compose("extract", backbone_overrides("smollm2")).backbone
    tok = load_tokenizer(bb, inspect_backbone(bb, None))
    config = LlamaConfig(**SHAPES[name], vocab_size=len(tok), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


if __name__ == "__main__":
    main()
