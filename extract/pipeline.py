"""`extract(cfg)`: fill (or find) the cache entry for one data set and one backbone.

The cache is consulted before any model is loaded; a hit costs a data set load and a few hashes.
On a miss the key's lock is taken, finished shards of an earlier run are kept, and only the missing
shards are computed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib.metadata import version

import torch
from omegaconf import DictConfig, ListConfig
from tqdm.auto import tqdm

from llmembed.cache.keys import FORMAT_VERSION, fingerprint
from llmembed.cache.store import STORE_DTYPES, Cache, Entry, EntryWriter
from llmembed.errors import UserError
from llmembed.extract.backbones import BackboneInfo, inspect_backbone, load_model, load_tokenizer
from llmembed.extract.datasets import TextDataset, load_dataset
from llmembed.extract.embedder import EmbedStats, Extractor
from llmembed.extract.ranks import Ranks
from llmembed.meter import Meter, combine

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPES = ("bfloat16", "float32")  # what `extract.dtype: auto` may resolve to


class ConfigError(UserError, ValueError):
    """An extraction setting is out of range; the message gives the valid values."""


@dataclass
class ExtractResult:
    entry: Entry
    hit: bool  # served from the cache without running the model
    stats: EmbedStats  # this run's work (zero on a hit)

    def summary(self) -> str:
        m = self.entry.manifest
        size_mb = self.entry.size_bytes() / 2**20
        if self.hit:
            return (
                f"cache hit: {m['dataset']['name']} x {m['backbone']['name']}, {m['rows']} rows, "
                f"{size_mb:.1f} MB at {self.entry.path}"
            )
        s = self.stats
        rate = s.tokens / s.seconds if s.seconds else 0.0
        return (
            f"extracted {m['dataset']['name']} x {m['backbone']['name']}: {s.texts} rows, "
            f"{s.tokens} tokens in {s.seconds:.1f} s ({s.texts / max(s.seconds, 1e-9):.1f} texts/s, "
            f"{rate:.0f} tokens/s), {size_mb:.1f} MB at {self.entry.path}"
        )


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 in hardware (GPUs; x86 CPUs with AVX512-BF16 or AMX).

    There, bfloat16 ran SmolLM2 2.5-3x faster than float32 at cosine 0.9999 and the same probe
    accuracy (benchmarks/RESULTS.md); elsewhere bfloat16 is emulated and no faster."""
    if device.startswith("cuda"):
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if name not in COMPUTE_DTYPES:
        raise ConfigError(
            f"extract.dtype must be auto or one of {sorted(COMPUTE_DTYPES)}, got {name!r}"
        )
    return name


def resolve_token_budget(value, device: str, info: BackboneInfo | None = None) -> int:
    """Padded tokens per batch. On CPU small batches are fastest (measured: 1024 tokens ran 3.7x
    faster than 16384 for SmolLM2). On a GPU `auto` sizes batches to half of the free memory, so that
    jobs sharing a card fit beside each other; out-of-memory still halves it."""
    if value != "auto":
        if int(value) < 1:
            raise ConfigError(
                f"extract.token_budget must be auto or a positive integer, got {value!r}"
            )
        return int(value)
    if not device.startswith("cuda"):
        return 1024
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    hidden, kept = (info.hidden_size, info.num_layers + 1) if info else (4096, 33)
    # Kept hidden states plus about 16 hidden-widths of working activations per token, bfloat16.
    per_token = (kept + 16) * hidden * 2
    return int(min(max(0.5 * free / per_token, 256), 131072))


def resolve_layers(requested, num_layers: int, name: str) -> list[int]:
    if requested == "all":
        return list(range(num_layers + 1))
    if not isinstance(requested, (list, tuple, ListConfig)) or not requested:
        raise ConfigError(
            f"extract.layers must be 'all' or a list of layer indices, got {requested!r}"
        )
    layers = sorted({int(x) + (num_layers + 1 if int(x) < 0 else 0) for x in requested})
    bad = [x for x in requested if not -(num_layers + 1) <= int(x) <= num_layers]
    if bad:
        raise ConfigError(
            f"layers {bad} requested but {name} has hidden states 0-{num_layers} "
            f"(0 = embeddings, {num_layers} = last layer); use layers within that range"
        )
    return layers


def resolve_poolings(requested, info: BackboneInfo, name: str) -> list[str]:
    if requested == "all":
        return list(info.poolings)
    requested = [requested] if isinstance(requested, str) else list(requested)
    if "first" in requested and info.constant_first:
        raise ConfigError(
            f"pooling 'first' of {name} ({info.model_type}) is the state of the BOS token that its "
            "tokenizer puts before every text: a causal model's first token sees nothing else, so "
            f"it is the same vector for every text; use one of {list(info.poolings)}"
        )
    unknown = [p for p in requested if p not in info.poolings]
    if unknown:
        raise ConfigError(
            f"pooling {unknown} is not available for {name} ({info.model_type}); "
            f"available: {list(info.poolings)}"
        )
    return sorted(set(requested))


def entry_spec(cfg: DictConfig, ds: TextDataset, info: BackboneInfo) -> dict:
    """Everything that changes the stored numbers, and nothing else: this hashes to the key."""
    ex = cfg.extract
    device = resolve_device(ex.device)
    if "{text}" not in ex.prompt:
        raise ConfigError(f"extract.prompt must contain {{text}}, got {ex.prompt!r}")
    if ex.truncation_side not in ("left", "right"):
        raise ConfigError(
            f"extract.truncation_side must be left or right, got {ex.truncation_side!r}"
        )
    if cfg.backbone.padding_side not in ("left", "right"):
        raise ConfigError(
            f"backbone.padding_side must be left or right, got {cfg.backbone.padding_side!r}"
        )
    if ex.store_dtype not in STORE_DTYPES:
        raise ConfigError(f"extract.store_dtype must be one of {sorted(STORE_DTYPES)}")
    max_length = int(ex.max_length)
    if info.max_positions and max_length > info.max_positions:
        log.info(
            "max_length %d > %s's %d positions: using %d",
            max_length,
            cfg.backbone.name,
            info.max_positions,
            info.max_positions,
        )
        max_length = info.max_positions
    return {
        "format_version": FORMAT_VERSION,
        "backbone": info.identity,
        "model_type": info.model_type,
        "compute_dtype": resolve_dtype(ex.dtype, device),
        "store_dtype": ex.store_dtype,
        "max_length": max_length,
        "truncation_side": ex.truncation_side,
        "prompt": ex.prompt,
        "dataset": {"fingerprint": ds.fingerprint(), "rows": len(ds)},
    }


def shard_plan(rows: int, bytes_per_row: int, shard_mb: float) -> list[tuple[int, int]]:
    per_shard = max(1, int(shard_mb * 2**20) // bytes_per_row)
    return [(s, min(s + per_shard, rows)) for s in range(0, rows, per_shard)]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped an extraction between or inside shards; finished shards are kept."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = int(signal_number)


@contextmanager
def stop_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM and `kill` send) stop the work at the next batch: the
    shard being built is discarded, the finished ones stay. Yields `check`, to call between batches.

    The handler only takes note: Python runs handlers between any two bytecodes, also inside a
    garbage-collection callback, where a raised exception is printed and dropped and the run goes on
    (seen in CI). A second signal raises at once. Only the main thread can own signal handlers, and a
    signal the process was started to ignore (SIGINT of a background job) stays ignored."""
    received: list[int] = []

    def check() -> None:
        if received:
            err = KeyboardInterrupt()
            err.signal_name, err.signal_number = signal.Signals(received[0]).name, received[0]
            raise err

    def handler(signum, frame) -> None:
        received.append(signum)
        if len(received) > 1:
            check()

    watched = []
    if threading.current_thread() is threading.main_thread():
        watched = [
            s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN
        ]
    previous = {s: signal.signal(s, handler) for s in watched}
    try:
        yield check
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class MissingEntryError(UserError, LookupError):
    """No cache entry covers a request and extraction was not allowed; says how to make one."""


def extract(
    cfg: DictConfig,
    *,
    dataset: TextDataset | None = None,
    need: tuple[list[int], list[str]] | None = None,
    allow_extract: bool = True,
) -> ExtractResult:
    """Find or build the cache entry for `cfg.dataset` x `cfg.backbone` (see conf/extract.yaml).

    `need` (layer indices, poolings) is what a hit must cover; by default what `cfg.extract` asks
    to store. A miss stores the union of both. `dataset` spares reloading an already loaded data
    set. With `allow_extract=False` a miss raises `MissingEntryError` naming the command to run.

    Under `accelerate launch` every process calls this: the main process decides (and alone holds
    the key's lock), the shards to compute are split between the processes, each writes its own
    shard files, and the main process writes the manifest once all are done.
    """
    cache = Cache(cfg.cache.root, group_writable=cfg.cache.get("group_writable", False))
    ds = dataset if dataset is not None else load_dataset(cfg.dataset)
    bb = cfg.backbone
    info = inspect_backbone(bb, cache.hash_memo())
    layers = resolve_layers(cfg.extract.layers, info.num_layers, bb.name)
    poolings = resolve_poolings(cfg.extract.poolings, info, bb.name)
    want = layers, poolings
    if need is not None:
        want = (
            resolve_layers(need[0], info.num_layers, bb.name),
            resolve_poolings(need[1], info, bb.name),
        )
        layers, poolings = sorted({*layers, *want[0]}), sorted({*poolings, *want[1]})
    spec = entry_spec(cfg, ds, info)
    key = fingerprint(spec)
    # `dtype: auto` takes an entry of either compute dtype, so that a sweep of CPU jobs reads what
    # a GPU job (bfloat16) extracted; a miss computes in this machine's own choice.
    keys = [key]
    if cfg.extract.dtype == "auto":
        keys += [fingerprint({**spec, "compute_dtype": d}) for d in AUTO_DTYPES]
        keys = list(dict.fromkeys(keys))

    def lookup() -> Entry | None:
        return next((e for k in keys if (e := cache.find(k, *want)) is not None), None)

    ranks = Ranks()

    with cache.creating(), ExitStack() as held:
        decision = None
        if ranks.is_main:
            try:
                if (entry := lookup()) is not None:
                    decision = ("hit", entry.path)
                elif not allow_extract:
                    raise MissingEntryError(
                        f"no cache entry under {cache.root} holds {ds.name} x {bb.name} (layers "
                        f"{want[0]}, poolings {want[1]}); make it with:\n  {extract_command(cfg)}"
                    )
                else:
                    cache.check_writable()  # readers need no write access; writers learn it now
                    held.enter_context(cache.lock(key))
                    if (entry := lookup()) is not None:  # made meanwhile by another job
                        decision = ("hit", entry.path)
                    else:
                        about = {"dataset": ds.name, "backbone": bb.name, "path": bb.path}
                        entry = cache.prepare(key, spec, layers, poolings, about=about)
                        _writer(cfg, entry, ds, info, layers, poolings).discard_leftovers()
                        decision = ("fill", entry.path)
            except Exception as err:  # the other processes must hear of it, not wait forever
                decision = ("error", err)
        kind, value = ranks.broadcast(decision)
        if kind == "error":
            raise value
        entry = Entry(value)
        if kind == "hit":
            log.info("cache hit for %s x %s: %s", ds.name, bb.name, entry.path)
            served = entry.spec["compute_dtype"]
            if served != spec["compute_dtype"]:
                log.info(
                    "extract.dtype=auto: serving the entry computed in %s (this machine would "
                    "compute %s); set extract.dtype=%s to compute your own",
                    served,
                    spec["compute_dtype"],
                    spec["compute_dtype"],
                )
            return ExtractResult(entry, hit=True, stats=EmbedStats())
        return ExtractResult(
            entry, hit=False, stats=_fill(cfg, entry, ds, info, spec, layers, poolings, ranks)
        )


def _stored(info: BackboneInfo, layers: list[int], poolings: list[str]) -> dict[str, list[int]]:
    """Layers stored per pooling: the pooler exists for the last layer only."""
    return {p: ([info.num_layers] if p == "pooler" else layers) for p in poolings}


def _writer(cfg, entry, ds, info, layers, poolings) -> EntryWriter:
    ex = cfg.extract
    itemsize = STORE_DTYPES[ex.store_dtype]().itemsize
    bytes_per_row = (
        sum(len(v) for v in _stored(info, layers, poolings).values()) * info.hidden_size * itemsize
    )
    return EntryWriter(
        entry, shard_plan(len(ds), bytes_per_row, ex.shard_mb), store_dtype=ex.store_dtype
    )


def extract_command(cfg: DictConfig) -> str:
    """The `llmembed-extract` command line that builds the entry `cfg` asks for."""
    from importlib.resources import files

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def group(name: str, value: str, fallback: str) -> str:
        known = (files("llmembed.conf") / name / f"{value}.yaml").is_file()
        return f"{name}={value if known else fallback}"

    groups = [
        group("dataset", cfg.dataset.name, "file"),
        group("backbone", cfg.backbone.name, "local"),
    ]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app, e.g. llmembed-classify
        default = compose("extract", overrides=groups)
    else:
        with initialize_config_module("llmembed.conf", version_base=None):
            default = compose("extract", overrides=groups)
    args = list(groups)
    for section in ("dataset", "backbone", "extract", "cache"):
        for k, v in cfg[section].items():
            if k not in default[section] or default[section][k] != v:
                args.append(f"{section}.{k}={_cli_value(v)}")
    return "llmembed-extract " + " ".join(args)


def _cli_value(v) -> str:
    if isinstance(v, (ListConfig, list)):
        return "[" + ",".join(map(str, v)) + "]"
    text = "null" if v is None else str(v)
    return f"'{text}'" if any(c in text for c in " {}'\"\\,") else text


def _fill(cfg, entry, ds, info, spec, layers, poolings, ranks: Ranks) -> EmbedStats:
    ex = cfg.extract
    stored = _stored(info, layers, poolings)
    writer = _writer(cfg, entry, ds, info, layers, poolings)
    # The main process says which shards are missing before anyone writes one.
    todo = ranks.broadcast(
        [i for i in range(len(writer.plan)) if i not in writer.done()] if ranks.is_main else None
    )
    mine = todo[ranks.index :: ranks.count]
    if ranks.is_main and len(todo) < len(writer.plan):
        log.info(
            "resuming %s: %d of %d shards already complete",
            entry.path,
            len(writer.plan) - len(todo),
            len(writer.plan),
        )
    device = ranks.device if ex.device == "auto" else ex.device
    gpus = [torch.device(device).index or 0] if device.startswith("cuda") else []
    stats = EmbedStats()
    with Meter(gpus, cpu_energy=ranks.is_local_main) as meter:
        if mine:
            _compute(cfg, writer, mine, ds, info, spec, layers, poolings, stored, device, stats)
    parts = ranks.gather((stats, meter.figures()))
    total = EmbedStats()
    for part, _ in parts:
        total.add(part)
    ranks.barrier()  # every shard is on disk
    if ranks.is_main:
        writer.finish(
            _manifest(
                cfg, ds, info, spec, layers, stored, total, device, combine([f for _, f in parts])
            )
        )
    ranks.barrier()  # the manifest is on disk before any process returns
    return total


def _compute(cfg, writer, shards, ds, info, spec, layers, poolings, stored, device, stats) -> None:
    """Run the model over this process's shards and write each as it finishes."""
    ex, bb = cfg.extract, cfg.backbone
    depth = max(layers + ([info.num_layers] if "pooler" in poolings else []))
    t0 = time.perf_counter()
    model = load_model(
        bb, info, depth=depth, dtype=COMPUTE_DTYPES[spec["compute_dtype"]], device=device
    )
    tokenizer = load_tokenizer(bb, info)  # seconds for a GGUF file, whose vocabulary is converted
    stats.load_seconds = time.perf_counter() - t0
    log.info(
        "loaded %s (%d of %d layers) and its tokenizer in %.1f s",
        bb.name,
        depth,
        info.num_layers,
        stats.load_seconds,
    )
    extractor = Extractor(
        model,
        tokenizer,
        layers=layers,
        poolings=poolings,
        max_length=spec["max_length"],
        prompt=ex.prompt,
        truncation_side=ex.truncation_side,
        padding_side=bb.padding_side,
        token_budget=resolve_token_budget(ex.token_budget, device, info),
        device=str(model.get_input_embeddings().weight.device),
        out_dtype=STORE_DTYPES[spec["store_dtype"]],
    )
    rows = sum(writer.plan[i][1] - writer.plan[i][0] for i in shards)
    with tqdm(
        total=rows,
        unit="text",
        desc=f"{ds.name} x {bb.name}",
        disable=not ex.progress,
        dynamic_ncols=True,
    ) as bar:
        seen = {"tokens": 0}
        try:
            with stop_on_signals() as check_signals:

                def on_batch(n: int, tokens: int) -> None:
                    seen["tokens"] += tokens
                    rate = seen["tokens"] / max(bar.format_dict["elapsed"], 1e-9)
                    bar.set_postfix(tok_s=f"{rate:.0f}", refresh=False)
                    bar.update(n)
                    check_signals()

                for i in shards:
                    check_signals()
                    start, stop = writer.plan[i]
                    emb, shard_stats = extractor.embed(ds.texts[start:stop], on_batch)
                    stats.add(shard_stats)
                    writer.write_shard(
                        i,
                        row_id=ds.row_ids[start:stop],
                        label=ds.labels[start:stop],
                        split=ds.split[start:stop],
                        emb=emb,
                        layers=stored,
                    )
        except KeyboardInterrupt as err:
            raise Interrupted(
                f"interrupted ({getattr(err, 'signal_name', 'SIGINT')}): {len(writer.done())} of "
                f"{len(writer.plan)} shards are complete in {writer.entry.path}; rerun the same "
                "command to resume with the rest",
                getattr(err, "signal_number", signal.SIGINT),
            ) from None
    if stats.truncated:
        log.info(
            "%d texts were longer than %d tokens and truncated", stats.truncated, spec["max_length"]
        )


def _manifest(
    cfg, ds, info, spec, layers, stored, stats: EmbedStats, device: str, resources: dict
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": len(ds),
        "hidden_size": info.hidden_size,
        "num_layers": info.num_layers,
        "layers": layers,
        # Per pooling its dataset's dtype: float32 where values went beyond the store dtype.
        "poolings": {
            p: {"layers": v, "dtype": "float32" if p in stats.widened else spec["store_dtype"]}
            for p, v in stored.items()
        },
        "store_dtype": spec["store_dtype"],
        "dataset": {"name": ds.name, "label_names": ds.label_names, "splits": ds.split_counts()},
        "backbone": {
            "name": cfg.backbone.name,
            "path": cfg.backbone.path,
            "model_type": info.model_type,
        },
        "versions": {p: version(p) for p in ("llmembed", "torch", "transformers", "h5py")},
        "extraction": {
            "device": device,
            "rows_computed": stats.texts,
            "tokens": stats.tokens,
            "padded_tokens": stats.padded_tokens,
            "truncated": stats.truncated,
            "forward_calls": stats.forward_calls,
            "oom_retries": stats.oom_retries,
            "seconds": round(stats.seconds, 3),
            "load_seconds": round(stats.load_seconds, 3),
            "tokens_per_s": round(stats.tokens / stats.seconds, 1) if stats.seconds else None,
            **resources,  # wall and CPU seconds, peak memory, energy (null with the reason)
        },
    }
