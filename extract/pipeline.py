"""`extract_texts(plan, texts)`: make sure a cache entry holds these texts, computing only those it lacks.

The cache is consulted before any model is loaded; a hit costs a few hashes and one index read. On a
miss the key's lock is taken, the append's plan is fixed (finished shards of an earlier, killed
append are kept), only the missing texts are computed and written as new shards, and the manifest
is rewritten last. Under `accelerate launch` every process calls this: the main process decides
(and alone holds the key's lock), the new shards are split between the processes, each writes its
own shard files, and the main process writes the manifest once all are done.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llmembed.cache.entry import Entry
from llmembed.cache.format import (
    EntrySpec,
    Manifest,
    PlannedShard,
    PoolingInfo,
    hashes_to_hex,
    hex_to_hashes,
)
from llmembed.cache.keys import text_hashes
from llmembed.cache.root import Cache
from llmembed.cache.writer import EntryWriter
from llmembed.errors import UserError
from llmembed.extract.plan import ExtractPlan, plan_from_config
from llmembed.extract.ranks import Ranks
from llmembed.extract.stats import EmbedStats
from llmembed.meter import Meter, combine

log = logging.getLogger(__name__)


class MissingEntryError(UserError, LookupError):
    """No cache entry holds a request and extraction was not allowed; says how to make one."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped an extraction between or inside shards; finished shards are kept."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = int(signal_number)


@dataclass
class ExtractResult:
    entry: Entry
    hashes: np.ndarray  # (n,) the request's text hashes, in request order
    hit: bool  # served from the cache without running the model
    stats: EmbedStats  # this run's work (zero on a hit)
    name: str = "texts"

    def read(self, pooling: str, layers) -> np.ndarray:
        """(n, len(layers), hidden) float32 for the request's texts, in request order."""
        return self.entry.read(pooling, layers, self.hashes)

    def summary(self) -> str:
        m = self.entry.manifest
        size_mb = self.entry.size_bytes() / 2**20
        where = f"{m.rows} texts, {size_mb:.1f} MB at {self.entry.path}"
        bb = m.backbone["name"]
        if self.hit:
            return f"cache hit: all {len(self.hashes)} texts of {self.name} x {bb} are stored ({where})"
        s = self.stats
        rate = s.tokens / s.seconds if s.seconds else 0.0
        return (
            f"extracted {self.name} x {bb}: {s.texts} new texts ({len(np.unique(self.hashes)) - s.texts} "
            f"already stored), {s.tokens} tokens in {s.seconds:.1f} s "
            f"({s.texts / max(s.seconds, 1e-9):.1f} texts/s, {rate:.0f} tokens/s); {where}"
        )


def find_entry(plan: ExtractPlan, hashes: np.ndarray) -> Entry | None:
    """A complete entry that stores the plan's needed layers and poolings for every text."""
    cache = Cache(plan.cache_root)
    for spec in plan.read_specs:
        if (
            entry := cache.find(spec.key, plan.need_layers, plan.need_poolings, hashes)
        ) is not None:
            return entry
    return None


def _target(cache: Cache, plan: ExtractPlan, hashes: np.ndarray) -> tuple[ExtractPlan, Entry]:
    """Which entry to append to: of those storing the needed layers and poolings, the one that
    already holds most of the texts (this machine's own dtype on a tie); else a new selection."""
    best = None
    for rank, spec in enumerate(plan.read_specs):
        for entry in cache.selections(spec.key, plan.need_layers, plan.need_poolings):
            score = (int(entry.holds(hashes).sum()), spec == plan.spec, -rank)
            if best is None or score > best[0]:
                best = (score, spec, entry)
    if best is None:
        return plan, cache.prepare(plan.spec, plan.layers, plan.poolings)
    _, spec, entry = best
    m = entry.manifest
    return plan.for_spec(spec).storing(m.layers, sorted(m.poolings)), entry


def _plan_append(
    writer: EntryWriter, plan: ExtractPlan, hashes: np.ndarray
) -> tuple[list[PlannedShard], list[PlannedShard]]:
    """(the append's shards, those still to compute). Shards of a killed append are kept: finished
    ones as they are, unfinished ones with the same texts (so a resumed run batches exactly as an
    uninterrupted one), as long as this request still asks for those texts."""
    entry = writer.entry
    base = entry.manifest if entry.complete else None
    held = entry.holds(hashes) if base else np.zeros(len(hashes), dtype=bool)
    pending, done = writer.pending(), writer.done()
    have = {h for s in pending if s.index in done for h in s.hashes}
    wanted = [h for h in dict.fromkeys(hashes_to_hex(hashes[~held])) if h not in have]
    left = set(wanted)
    shards = []
    for s in pending:
        if s.index in done or (s.hashes and left.issuperset(s.hashes)):
            shards.append(s)
            left.difference_update(s.hashes)
    rest = [h for h in wanted if h in left]
    used = [s.index for s in (base.shards if base else ())] + [s.index for s in pending]
    index = max(used, default=-1) + 1
    per_shard = max(1, int(plan.shard_mb * 2**20) // plan.bytes_per_row())
    for start in range(0, len(rest), per_shard):
        shards.append(PlannedShard(index, tuple(rest[start : start + per_shard])))
        index += 1
    writer.set_pending(shards)
    return shards, [s for s in shards if s.index not in done]


@dataclass(frozen=True)
class Request:
    """What a caller asks for: the texts, who asks (a data set's name), how to stop."""

    texts: list[str]
    hashes: np.ndarray  # (n,) S32, text_hashes(texts)
    name: str
    check_stop: Callable[[], None] | None = None

    @cached_property
    def by_hash(self) -> dict[str, str]:
        """Hex text hash -> text (duplicates collapse: each distinct text is computed once)."""
        return dict(zip(hashes_to_hex(self.hashes), self.texts, strict=True))

    def stop_here(self) -> None:
        if self.check_stop is not None:
            self.check_stop()


@dataclass(frozen=True)
class Append:
    """The main process's decision on a miss, the same on every process: which entry (and so which
    spec, layers and poolings) takes the new shards, which shards are still to compute."""

    path: Path
    spec: dict
    layers: tuple[int, ...]
    poolings: tuple[str, ...]
    todo: tuple[PlannedShard, ...]
    total: int  # shards of the append, finished ones included

    def plan(self, plan: ExtractPlan) -> ExtractPlan:
        return plan.for_spec(EntrySpec.from_dict(self.spec)).storing(self.layers, self.poolings)


def extract_texts(
    plan: ExtractPlan,
    texts: list[str],
    *,
    name: str = "texts",
    allow_extract: bool = True,
    check_stop: Callable[[], None] | None = None,
    fill_command: str | None = None,
) -> ExtractResult:
    """Find or complete the cache entry that holds `texts` for the plan.

    Only the texts no entry holds are computed (each distinct text once), and stored as new shards
    of the entry that already holds most of them. With `allow_extract=False` a miss raises
    `MissingEntryError` (naming `fill_command` when given). `check_stop` is called between
    batches; a KeyboardInterrupt from it (or from Ctrl-C) stops the run, keeping finished shards.
    `name` (a data set's) is recorded as a user of the entry.
    """
    request = Request(list(texts), text_hashes(texts), name, check_stop)
    cache = Cache(plan.cache_root, group_writable=plan.group_writable)
    ranks = Ranks()
    with cache.creating(), ExitStack() as held:
        decision: Path | Append | Exception | None = None
        if ranks.is_main:
            try:
                if (entry := find_entry(plan, request.hashes)) is not None:
                    decision = entry.path
                elif not allow_extract:
                    raise MissingEntryError(_missing_message(cache, plan, request, fill_command))
                else:
                    decision = _decide(cache, plan.confirmed(), request.hashes, held)
            except Exception as err:  # the other processes must hear of it, not wait forever
                decision = err
        decision = ranks.broadcast(decision)
        if isinstance(decision, Exception):
            raise decision
        if isinstance(decision, Path):
            entry = Entry(decision)
            if ranks.is_main:
                entry.touch(name)
            log.info("cache hit for %s x %s: %s", name, plan.backbone.name, entry.path)
            served, own = entry.spec.compute_dtype, plan.spec.compute_dtype
            if served != own:
                log.info(
                    "extract.dtype=auto: serving the entry computed in %s (this machine would "
                    "compute %s); set extract.dtype=%s to compute your own",
                    served,
                    own,
                    own,
                )
            return ExtractResult(entry, request.hashes, hit=True, stats=EmbedStats(), name=name)
        stats = _fill(decision.plan(plan), decision, request, ranks)
        entry = Entry(decision.path)
        if ranks.is_main:
            entry.touch(name)
        return ExtractResult(entry, request.hashes, hit=False, stats=stats, name=name)


def _missing_message(cache: Cache, plan: ExtractPlan, request: Request, command) -> str:
    return (
        f"no cache entry under {cache.root} holds all {len(request.hashes)} texts of "
        f"{request.name} for {plan.backbone.name} (layers {list(plan.need_layers)}, poolings "
        f"{list(plan.need_poolings)})" + (f"; make it with:\n  {command}" if command else "")
    )


def _decide(cache: Cache, plan: ExtractPlan, hashes: np.ndarray, held: ExitStack) -> Path | Append:
    """On the main process, after a miss: take the target key's lock (held until the job ends) and
    fix the append; or the entry another job made meanwhile."""
    cache.check_writable()  # readers need no write access; writers learn it now
    target, entry = _target(cache, plan, hashes)
    held.enter_context(cache.lock(target.key))
    if (found := find_entry(plan, hashes)) is not None:  # made meanwhile by another job
        return found.path
    writer = EntryWriter(entry, key=target.key)
    writer.discard_leftovers()
    shards, todo = _plan_append(writer, target, hashes)
    if len(todo) < len(shards):
        log.info(
            "resuming %s: %d of %d new shards already complete",
            entry.path,
            len(shards) - len(todo),
            len(shards),
        )
    return Append(
        entry.path, target.spec.as_dict(), target.layers, target.poolings, tuple(todo), len(shards)
    )


def _fill(plan: ExtractPlan, append: Append, request: Request, ranks: Ranks) -> EmbedStats:
    """Every process computes its share of the new shards; the main process then commits."""
    writer = EntryWriter(Entry(append.path), key=plan.key)
    mine = append.todo[ranks.index :: ranks.count]
    device = ranks.device if plan.device == "auto" else plan.device
    gpus = [int(device.split(":")[1]) if ":" in device else 0] if device.startswith("cuda") else []
    stats = EmbedStats()
    with Meter(gpus, cpu_energy=ranks.is_local_main) as meter:
        if mine:
            stats = _compute(plan, writer, mine, request, device)
    parts = ranks.gather((stats, meter.figures()))
    work = EmbedStats()
    for part, _ in parts:
        work.add(part)
    ranks.barrier()  # every shard is on disk
    if ranks.is_main:
        entry = writer.entry
        base = entry.manifest if entry.complete else None
        figures = combine([f for _, f in parts])
        writer.commit(
            base=base,
            fields=_manifest_fields(plan, base, work.widened),
            extraction=_extraction_record(work, device, request.name, figures),
        )
    ranks.barrier()  # the manifest is on disk before any process returns
    return work


class WriteAhead:
    """A shard's write (HDF5 image, fsync, sha256, sidecar) runs on a thread while the model computes
    the next shard. One write at most is in flight, so memory holds two shards at most, whatever the
    number of texts; a failed write raises at the next `submit` or `wait`."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llmembed-write")
        self._pending: Future | None = None

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args, **kwargs)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def finish(self) -> None:
        """Let a write in flight end (its error is not this caller's to raise) and stop the thread.
        Called while stopping: a second Ctrl-C or SIGTERM during the wait is absorbed, so the stop
        still ends with its resume message, and the shard being written is kept whole."""
        pending, self._pending = self._pending, None
        while pending is not None and not pending.done():
            try:
                wait([pending])
            except KeyboardInterrupt:
                continue
        self._pool.shutdown()


def _compute(plan, writer: EntryWriter, shards, request: Request, device: str) -> EmbedStats:
    """Run the model over this process's new shards and write each as it finishes."""
    from llmembed.extract.embed import load_embedder  # torch: imported only when computing

    stats = EmbedStats()
    extractor, stats.load_seconds = load_embedder(plan, device)
    with tqdm(
        total=sum(len(s.hashes) for s in shards),
        unit="text",
        desc=f"{request.name} x {plan.backbone.name}",
        disable=not plan.progress,
        dynamic_ncols=True,
    ) as bar:
        seen = {"tokens": 0}

        def on_batch(n: int, tokens: int) -> None:
            seen["tokens"] += tokens
            rate = seen["tokens"] / max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix(tok_s=f"{rate:.0f}", refresh=False)
            bar.update(n)
            request.stop_here()

        ahead = WriteAhead()
        try:
            for shard in shards:
                request.stop_here()
                texts = [request.by_hash[h] for h in shard.hashes]
                emb, shard_stats = extractor.embed(texts, on_batch)
                stats.add(shard_stats)
                ahead.submit(
                    writer.write_shard,
                    shard.index,
                    hashes=hex_to_hashes(shard.hashes),
                    emb=emb,
                    layers=plan.stored,
                )
            ahead.wait()
        except KeyboardInterrupt as err:
            ahead.finish()  # the shard being written is kept: it is complete, or not there at all
            raise Interrupted(
                f"interrupted ({getattr(err, 'signal_name', 'SIGINT')}): {len(writer.done())} of "
                f"{len(writer.pending())} new shards are complete in {writer.entry.path}; rerun "
                "the same command to resume with the rest",
                getattr(err, "signal_number", signal.SIGINT),
            ) from None
        finally:
            ahead.finish()
    if stats.truncated:
        log.info(
            "%d texts were longer than %d tokens and truncated",
            stats.truncated,
            plan.spec.max_length,
        )
    return stats


def _manifest_fields(plan: ExtractPlan, base: Manifest | None, widened: set[str]) -> dict:
    """Per pooling its dtype: float32 where any shard holds values beyond the store dtype's range
    (widened by the extractor in this append or an earlier one), else the store dtype."""
    dtype = plan.spec.store_dtype
    poolings = {}
    for p, layers in plan.stored.items():
        old = base.poolings[p].dtype if base and p in base.poolings else dtype
        wide = "float32" in (old, dtype) or p in widened
        poolings[p] = PoolingInfo(tuple(layers), "float32" if wide else dtype)
    return {
        "hidden_size": plan.info.hidden_size,
        "num_layers": plan.info.num_layers,
        "layers": tuple(plan.layers),
        "poolings": poolings,
        "backbone": {
            "name": plan.backbone.name,
            "path": plan.backbone.path,
            "model_type": plan.info.model_type,
        },
        "versions": {p: version(p) for p in ("llmembed", "torch", "transformers", "h5py")},
    }


def _extraction_record(stats: EmbedStats, device: str, name: str, resources: dict) -> dict:
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": name,
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
    }


def extract(
    cfg,
    *,
    dataset=None,
    need=None,
    allow_extract: bool = True,
    check_stop: Callable[[], None] | None = None,
) -> ExtractResult:
    """`extract_texts` for a composed `extract` config: its data set's texts and its backbone.
    `dataset` spares reloading an already loaded data set; `need` (layers, poolings) is what an
    existing entry must store (default: what `cfg.extract` asks for)."""
    from llmembed.extract.command import extract_command
    from llmembed.extract.datasets import dataset_texts

    name, texts = (
        (dataset.name, dataset.texts) if dataset is not None else dataset_texts(cfg.dataset)
    )
    plan = plan_from_config(cfg, need=need)
    return extract_texts(
        plan,
        texts,
        name=name,
        allow_extract=allow_extract,
        check_stop=check_stop,
        fill_command=None if allow_extract else extract_command(cfg),
    )
