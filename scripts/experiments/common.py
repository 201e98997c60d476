"""What every results runner shares: composing the committed configs, running llmembed's classify
step over the repeated splits, choosing on validation, summarizing over splits, writing JSON.

Protocol (docs/RESULTS.md): `seeds=[0..4]` with `resplit=true` draws one stratified
train/validation/test split per seed from one cache entry (no new forward pass). Every choice is
made per split on that split's validation scores (`choose`); only the chosen candidate's test score
is read (`chosen_test`). Means and 95% t-intervals are over the splits (`over_splits`).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from threadpoolctl import threadpool_limits

import llmembed  # noqa: F401  (registers the config resolvers)
from llmembed.classify.metrics import t_interval
from llmembed.classify.train import seeds_of, train
from llmembed.data.datasets import TextDataset, load_dataset, resplit
from llmembed.errors import UserError
from llmembed.meter import Meter
from llmembed.overrides import check_overrides

log = logging.getLogger("results")
# Threads while fitting heads (not while extracting). Measured on the shared 2-core machine under
# load: a logreg fit took 20.7 s with 2 OpenBLAS threads and 1.5 s with one, and 10 epochs of the
# paper's head 51 s with 2 torch threads and 13 s with one (a thread spins while the other waits for
# a core). `results.head_threads` sets the torch threads; BLAS stays at one.
BLAS_THREADS = 1


def metered() -> Meter:
    """A meter of this process's GPU where there is one (NVML joules), else of the CPU (RAPL)."""
    return Meter([0] if torch.cuda.is_available() else [])


@contextmanager
def head_threads(cfg: DictConfig):
    """One BLAS thread and `results.head_threads` torch threads (null: torch's default)."""
    n = cfg.get("results", {}).get("head_threads")
    before = torch.get_num_threads()
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        if n:
            torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(before)


def pre_extract(cfg: DictConfig, argv: Sequence[str], backbones: Sequence[str]) -> None:
    """Fill (or find) the cache entries of `backbones` on the config's data set with llmembed's
    extraction at full thread count, before heads are fitted with fewer threads."""
    from llmembed.extract.pipeline import extract

    keep = [
        a
        for a in argv
        if a.split("=", 1)[0].lstrip("+~").split(".")[0] in ("dataset", "extract", "cache")
    ]
    keep = [a for a in keep if not a.startswith("dataset=")]
    for b in backbones:
        res = extract(
            compose_cfg("extract", [f"dataset={cfg.dataset.name}", f"backbone={b}", *keep])
        )
        log.info("%s", res.summary())


SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
METRICS = ("accuracy", "macro_f1")


def run_main(main: Callable[[list[str]], None]) -> None:
    """An experiment's command line: what the user can fix (data that cannot be loaded, a damaged
    cache entry: a `UserError`) is one message and exit status 1, as its other errors; anything
    else is a bug of ours and keeps its traceback."""
    try:
        main(sys.argv[1:])
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


# --- configs -------------------------------------------------------------------------------------
def compose_cfg(name: str, overrides: Sequence[str]) -> DictConfig:
    """`name` (classify / extract) composed exactly as the CLI composes it. An override Hydra
    cannot apply (an unknown data set, a misspelled key) is one message, before any work."""
    try:
        with initialize_config_module("llmembed.conf", version_base=None):
            return compose(name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        message = str(err).split("\nConfig search path:")[0].strip()  # not Hydra's internals
        raise SystemExit(f"error: {message}") from None


def experiment_cfgs(experiment: str, argv: Sequence[str]) -> list[DictConfig]:
    """One classify config per data set of `results.datasets`, each composed from
    `experiment=<experiment>` and the command line's overrides (applied to every data set). A
    key nothing reads, or seeds that cannot be split, raise a `UserError` (run_main reports it)."""
    check_overrides("classify", [f"experiment={experiment}", *argv])
    base = compose_cfg("classify", [f"experiment={experiment}", *argv])
    seeds_of(base)
    names = list(base.results.datasets)
    user = [a for a in argv if not a.startswith("dataset=")]
    return [
        compose_cfg("classify", [f"experiment={experiment}", f"dataset={d}", *user]) for d in names
    ]


def device_name(m: dict) -> str:
    """The processor a result file's `machine` computed on: its GPU, else its CPU."""
    return m.get("gpu") or m["cpu"]


def split_machines(run: dict) -> list[str]:
    """The processors one split's record says it ran on: `machines` where its learning rates ran
    on different ones (records reused from another machine), else its `machine` (merge stamps
    files that did not record it)."""
    return run.get("machines") or ([run["machine"]] if run.get("machine") else [])


def machines_of(row: dict) -> list[str]:
    """The processors a row's splits ran on; more than one means its mean seconds mix machines."""
    return sorted({m for r in row.get("runs", {}).values() for m in split_machines(r)})


def per_dataset(value, dataset: str):
    """A setting given once, or per data set as {name: value}."""
    return value[dataset] if OmegaConf.is_dict(value) or isinstance(value, dict) else value


def head_config(name: str) -> DictConfig:
    """conf/head/<name>.yaml as composed (to swap the head of an already composed config)."""
    return compose_cfg("classify", [f"head={name}"]).head


def command_line(module: str, argv: Sequence[str], cfg: DictConfig | None = None) -> str:
    """The command as typed, with the settings that decide whether earlier runs are reused
    (`results.run_dir`, `results.resume`) spelled out when the config supplied them."""
    shown = list(argv)
    results = cfg.get("results", {}) if cfg is not None else {}
    for key in ("run_dir", "resume"):
        if key in results and not any(a.startswith(f"results.{key}=") for a in argv):
            value = results[key]
            shown.append(
                f"results.{key}={str(value).lower() if isinstance(value, bool) else value}"
            )
    return " ".join([".venv/bin/python -m", module, *shown]).strip()


def with_changes(cfg: DictConfig, **changes) -> DictConfig:
    """A copy of `cfg` with top-level dotted keys set (e.g. `{"head.params.sigma": 0.1}`).

    A key may be new only under `head.params`: the heads take parameters that conf/head/*.yaml does
    not list (`standardize`, `project_same_width` of the paper's head; on the command line they
    need a `+`), and a misspelled key anywhere else still fails."""
    out = cfg.copy()
    for key, value in changes.items():
        parent = key.rsplit(".", 1)[0] if "." in key else None
        if parent == "head.params":
            with open_dict(out.head.params):
                OmegaConf.update(out, key, value, merge=False)
        else:
            OmegaConf.update(out, key, value, merge=False)
    return out


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- data ----------------------------------------------------------------------------------------
def split_datasets(cfg: DictConfig) -> dict[int, TextDataset]:
    """The split of every seed, drawn exactly as `llmembed-classify resplit=true` draws it."""
    ds = load_dataset(cfg.dataset)
    return {s: resplit(ds, s) for s in seeds_of(cfg)}


# --- running llmembed and reading its scores ------------------------------------------------------
@dataclass
class Scores:
    """One candidate's scores on every split: {split seed: {"validation"|"test": {metric: value}}},
    plus what llmembed measured while producing them."""

    name: str
    per_split: dict[int, dict[str, dict[str, float]]]
    info: dict = field(default_factory=dict)

    def validation(self, seed: int, metric: str = "accuracy") -> float:
        return self.per_split[seed]["validation"][metric]


# How many runs this process fitted and how many it took from earlier runs in `results.run_dir`
# (`results.resume=true`): llmembed's (a configuration over every split), or experiment 4's
# fine-tuning runs (one split, one learning rate). Each result file records it; the page shows it.
RUNS = {"fitted": 0, "reused": 0}


def classify(cfg: DictConfig, out_dir: Path, name: str) -> Scores:
    """`llmembed-classify` over the config's seeds (one split each with resplit=true), in process."""
    t = time.perf_counter()
    m = finished_run(cfg, out_dir)
    reused = m is not None
    RUNS["reused" if reused else "fitted"] += 1
    if m is None:
        with head_threads(cfg):
            m = train(cfg, out_dir)
    per_split = {
        int(r["seed"]): {
            part: {k: float(r[part][k]) for k in METRICS} for part in ("validation", "test")
        }
        for r in m["runs"]
    }
    info = {
        "features": m["features"],
        "n_features": m["n_features"],
        "head": m["head"],
        "fusion": m["fusion"],
        "rows": m["rows"],
        "timings": m["timings"],
        "resources": m["resources"],
        "extraction": m["extraction"],
        "params_trained": params_trained(m, cfg),
        "n_seeds": len(m["seeds"]),
        "metrics_json": str(Path(out_dir) / "metrics.json"),
        "wall_s": round(time.perf_counter() - t, 2),
        "reused": reused,  # taken from an earlier run in results.run_dir, not fitted now
    }
    log.info(
        "%s: validation %.4f test %.4f (%.1f s)",
        name,
        *(np.mean([s[p]["accuracy"] for s in per_split.values()]) for p in ("validation", "test")),
        info["wall_s"],
    )
    return Scores(name, per_split, info)


def finished_run(cfg: DictConfig, out_dir: Path) -> dict | None:
    """The metrics of an earlier run of exactly this config in `out_dir` (a stopped runner resumes
    where it stopped), unless `results.resume=false`."""
    path = Path(out_dir) / "metrics.json"
    if not cfg.get("results", {}).get("resume", True) or not path.is_file():
        return None
    m = json.loads(path.read_text())
    return m if _what_counts(m.get("config")) == _what_counts(cfg) else None


# Where results go and which data sets one invocation covers do not change a run's figures: a run
# made by `results.datasets=[mr]` (say, in a second process) is reused by the full command.
_ORCHESTRATION = ("datasets", "out_dir", "resume")


def _what_counts(cfg) -> dict | None:
    if cfg is None:
        return None
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    plain = json.loads(json.dumps(plain))  # a copy
    for key in _ORCHESTRATION:
        plain.get("results", {}).pop(key, None)
    return plain


def params_trained(metrics: dict, cfg: DictConfig, widths: dict[str, int] | None = None) -> int:
    """Trainable parameters of the head llmembed fitted, counted from its shapes. `widths`: hidden
    size per backbone name (default: read from each backbone's config)."""
    d = int(metrics["n_features"])
    k = len(metrics["runs"][0]["test"]["per_class"])
    if metrics["head"] == "logreg":
        return (d + 1) * (1 if k == 2 else k)
    p = cfg.head.params
    if metrics["head"] == "mlp":
        return _mlp([d, *p.hidden, k])
    # the paper's head: a projection per block, the co-occurrence (no weights), then an MLP
    widths = widths or {}
    blocks = [
        (widths.get(s["backbone"]) or hidden_size(s["backbone"]), s["role"])
        for s in metrics["sources"]
        for _ in s["layers"]
    ]
    assert sum(w for w, _ in blocks) == d, (blocks, d)
    width, same = int(p.width), bool(p.get("project_same_width", True))
    proj = sum(
        0 if (w == width and r == "encoder" and not same) else (w + 1) * width for w, r in blocks
    )
    n, llm = len(blocks), next(w for w, r in blocks if r == "llm")
    return proj + _mlp([n * (n + 1) // 2 + llm, *p.hidden, k])


def _mlp(widths: list[int]) -> int:
    return sum((a + 1) * b for a, b in itertools.pairwise(widths))


@functools.cache
def hidden_size(backbone: str) -> int:
    """Hidden size of conf/backbone/<backbone>.yaml's model, from its config (no weights loaded)."""
    from transformers import AutoConfig

    folder, kw = model_location(backbone_path(backbone))
    return int(AutoConfig.from_pretrained(folder, **kw).get_text_config().hidden_size)


# --- choosing on validation ----------------------------------------------------------------------
def selection(candidates: Sequence[Scores]) -> dict:
    """What making one split's choice among `candidates` cost: how many fits, their seconds (each
    candidate's fit on that split; a run that fitted every split at once, as experiment 1's, counts
    its mean per split) and the backbones they read (each must be extracted to choose)."""
    fit = [c.info["timings"]["fit_s"] / max(c.info.get("n_seeds", 1), 1) for c in candidates]
    backbones = {e["backbone"] for c in candidates for e in c.info["extraction"]}
    return {"fits": len(candidates), "fit_s": round(sum(fit), 3), "backbones": sorted(backbones)}


def choose(candidates: Sequence[Scores], seed: int, metric: str = "accuracy") -> Scores:
    """The candidate with the best validation score on split `seed`; ties go to the earlier
    candidate (list the simpler or cheaper ones first). Test scores are not looked at."""
    best = max(range(len(candidates)), key=lambda i: (candidates[i].validation(seed, metric), -i))
    return candidates[best]


def chosen_test(choices: dict[int, Scores]) -> dict[str, dict]:
    """Test scores of the candidate chosen on each split, summarized over the splits."""
    seeds = sorted(choices)
    return {
        k: over_splits([choices[s].per_split[s]["test"][k] for s in seeds], seeds) for k in METRICS
    }


def over_splits(values: Sequence[float], seeds: Sequence[int] | None = None) -> dict:
    """{mean, std, n, ci, values, seeds}: the 95% t-interval of the mean over splits, and which
    split each value is (paired tests match methods split by split)."""
    v = np.asarray(values, dtype=float)
    ci = t_interval(v) if len(v) > 1 else [float(v[0]), float(v[0])]
    out = {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "n": len(v),
        "ci": [float(x) for x in ci],
        "values": [float(x) for x in v],
    }
    if seeds is not None:
        out["seeds"] = [int(s) for s in seeds]
    return out


def summary_of(scores: Scores, part: str = "test") -> dict:
    seeds = sorted(scores.per_split)
    return {k: over_splits([scores.per_split[s][part][k] for s in seeds], seeds) for k in METRICS}


# --- scoring our own predictions ------------------------------------------------------------------
def scores_from_predictions(
    name: str,
    splits: dict[int, TextDataset],
    predict: Callable[[int, np.ndarray], np.ndarray],
    parts: Sequence[str] = ("validation", "test"),
) -> Scores:
    """Scores of `predict(seed, row_indices) -> labels` on the chosen parts of every split."""
    from sklearn.metrics import accuracy_score, f1_score

    per = {}
    for seed, ds in splits.items():
        per[seed] = {}
        for part in parts:
            idx = np.flatnonzero(ds.split == SPLIT_CODES[part])
            pred = predict(seed, idx)
            y = ds.labels[idx]
            per[seed][part] = {
                "accuracy": float(accuracy_score(y, pred)),
                "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
            }
    return Scores(name, per)


# --- files ---------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def write_json(path: Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of this process's own: processes writing one file never share one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_plain))
    tmp.replace(path)
    log.info("wrote %s", path)
    return path


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def read_json(path: Path, needed_by: str) -> dict:
    """A result file, or one message naming it: missing, or cut off / garbled."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{needed_by} needs {path}: run its experiment first (see docs/RESULTS.md)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not a result file ({e}): rerun the experiment that wrote it"
        ) from None


def header(cfg: DictConfig, experiment: str, module: str, argv: Sequence[str]) -> dict:
    """What every result file starts with: the command, the protocol, the machine, the config."""
    return {
        "experiment": experiment,
        "command": command_line(module, argv, cfg),
        "config": f"conf/experiment/{experiment}.yaml",
        "seeds": seeds_of(cfg),
        "resplit": bool(cfg.resplit),
        "dataset_limit": cfg.dataset.get("limit"),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


# What makes result files of one protocol: those with the same values may be merged.
PROTOCOL = ("seeds", "resplit", "dataset_limit")


def finish(result: dict) -> dict:
    """`result` with this process's count of fitted and reused runs (a file continued by several
    commands keeps one count per command; one that ran none, such as prompting, adds none)."""
    earlier = [r for r in result.get("runs", []) if r["command"] != result["command"]]
    done = [{"command": result["command"], **RUNS}] if any(RUNS.values()) else []
    return {**result, "runs": [*earlier, *done]}


def commands_of(result: dict) -> list[str]:
    """The commands that made a result file (one, or several for one merged or continued)."""
    return list(result.get("commands") or [result["command"]])


def continue_result(path: Path, result: dict) -> dict:
    """`result` with the data sets of an earlier result file of the same protocol (seeds, resplit,
    limit): a run on one data set, or one part, adds to the file instead of replacing it."""
    path = Path(path)
    if not path.is_file():
        return result
    earlier = json.loads(path.read_text())
    if any(earlier.get(k) != result[k] for k in PROTOCOL):
        log.warning("%s holds another protocol's results: replacing it", path)
        return result
    return {
        **result,
        "datasets": earlier["datasets"],
        "commands": [*commands_of(earlier), result["command"]],
        "runs": earlier.get("runs", []),
    }


def entry_mb(path: str) -> float:
    """Size of one cache entry folder on disk (all its layers and poolings), in MB."""
    total = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return round(total / 2**20, 2)


def resolve_compute_dtype(name: str) -> torch.dtype:
    """`auto`: bfloat16 on GPUs and on CPUs that multiply it natively (as llmembed's extraction),
    else float32, so the counterparts run at the same precision as llmembed on this machine."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    if torch.cuda.is_available():
        return torch.bfloat16
    native = any(
        getattr(torch.cpu, f, lambda: False)()
        for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return torch.bfloat16 if native else torch.float32


# --- models loaded directly (the parts llmembed does not have) -----------------------------------
def model_location(path: str) -> tuple[str, dict]:
    """(folder, from_pretrained kwargs) for a model folder or a .gguf file (packaged SmolLM2)."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return str(p), {}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    folder, kw = model_location(path)
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, kind: str, dtype: torch.dtype):
    """`kind`: "base" (hidden states; the encoder fine-tuning starts from) or "causal" (with its LM head)."""
    import transformers

    folder, kw = model_location(path)
    cls = {"base": transformers.AutoModel, "causal": transformers.AutoModelForCausalLM}[kind]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU where there is one
    return cls.from_pretrained(folder, dtype=dtype, **kw).to(device).eval()


def backbone_path(name: str) -> str:
    """The resolved path of conf/backbone/<name>.yaml (the packaged file on this machine)."""
    return str(compose_cfg("extract", [f"backbone={name}"]).backbone.path)


def backbone_spec(name: str) -> dict:
    """conf/backbone/<name>.yaml as written (its path unresolved): which model a name stands for,
    the same on every machine."""
    spec = OmegaConf.to_container(compose_cfg("extract", [f"backbone={name}"]).backbone)
    return {k: v for k, v in spec.items() if k != "device_map"}  # where it runs, not what
