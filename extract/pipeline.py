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
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llmembed.cache.entry import Entry
from llmembed.cache.format import (
    CacheRootError,
    EntrySpec,
    Manifest,
    PlannedShard,
    PoolingInfo,
)
from llmembed.cache.keys import text_hashes
from llmembed.cache.root import Cache, not_writable, writable
from llmembed.cache.writer import EntryWriter
from llmembed.errors import Interrupted, UserError
from llmembed.extract.batching import Tokens, cut_shards, plan_batches
from llmembed.extract.plan import ExtractPlan, plan_from_config, resolve_token_budget, shard_bytes
from llmembed.extract.ranks import Ranks
from llmembed.extract.stats import EmbedStats
from llmembed.meter import Meter, combine

log = logging.getLogger(__name__)


class MissingEntryError(UserError, LookupError):
    """No cache entry holds a request and extraction was not allowed; says how to make one."""


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


@dataclass(frozen=True)
class Request:
    """What a caller asks for: the texts, who asks (a data set's name), how to stop."""

    texts: list[str]
    hashes: np.ndarray  # (n,) S32, text_hashes(texts)
    name: str
    check_stop: Callable[[], None] | None = None

    @cached_property
    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.hashes, kind="stable")
        return self.hashes[order], order

    def texts_of(self, hashes: np.ndarray) -> list[str]:
        """The texts with these hashes (each must be requested)."""
        sorted_hashes, order = self._sorted
        at = np.searchsorted(sorted_hashes, hashes)
        return [self.texts[i] for i in order[at]]

    def distinct(self) -> np.ndarray:
        """Positions of the first copy of each distinct text, in request order."""
        _, first = np.unique(self.hashes, return_index=True)
        return np.sort(first)

    def stop_here(self) -> None:
        if self.check_stop is not None:
            self.check_stop()


@dataclass(frozen=True)
class Append:
    """The main process's decision on a miss, the same on every process: which entry (and so which
    spec, layers and poolings) takes the new shards; the shards of a killed append that are kept
    (replayed with their recorded batches); which texts are still to plan."""

    path: Path
    spec: dict
    layers: tuple[int, ...]
    poolings: tuple[str, ...]
    kept: tuple[PlannedShard, ...]
    rest: np.ndarray  # positions into the request's texts, distinct texts the plan does not hold
    next_index: int  # the first shard index for newly planned shards

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
                    decision = _decide(cache, plan.confirmed(), request, held)
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
        f"{list(plan.need_poolings)})" + (f"; make it with: {command}" if command else "")
    )


def _decide(cache: Cache, plan: ExtractPlan, request: Request, held: ExitStack) -> Path | Append:
    """On the main process, after a miss: take the target key's lock (held until the job ends) and
    fix the append; or the entry another job made meanwhile. Refuses, before any model is loaded,
    an append the disk cannot hold."""
    cache.check_writable()  # readers need no write access; writers learn it now
    target, entry = _target(cache, plan, request.hashes)
    held.enter_context(cache.lock(target.key))
    if (found := find_entry(plan, request.hashes)) is not None:  # made meanwhile by another job
        return found.path
    if not writable(entry.path):  # a selection another user made in a key folder we may write
        raise not_writable(entry.path, "append to the cache entry")
    writer = EntryWriter(entry, key=target.key)
    writer.discard_leftovers()
    base = entry.manifest if entry.complete else None
    wanted = request.distinct()
    if base is not None:
        wanted = wanted[~entry.holds(request.hashes[wanted])]
    pending, done = writer.pending(), writer.done()
    want = request.hashes[wanted]
    # A killed append's shards stay when finished, or when every text of theirs is still asked
    # for: then they are replayed with their recorded batches, as the killed run would have.
    kept = [s for s in pending if s.index in done or np.isin(s.hashes, want).all()]
    covered = np.concatenate([s.hashes for s in kept]) if kept else want[:0]
    rest = wanted[~np.isin(want, covered)]
    if len(kept) < len(pending):
        log.info("%s: %d shards of a killed append no longer asked for: dropped", entry.path,
                 len(pending) - len(kept))  # fmt: skip
    if kept:
        log.info(
            "resuming %s: %d of %d planned shards already complete",
            entry.path,
            sum(s.index in done for s in kept),
            len(kept),
        )
    todo_rows = len(rest) + sum(s.rows for s in kept if s.index not in done)
    _check_space(entry, target, todo_rows)
    used = [s.index for s in (base.shards if base else ())] + [s.index for s in pending]
    return Append(
        entry.path,
        target.spec.as_dict(),
        target.layers,
        target.poolings,
        tuple(kept),
        rest,
        max(used, default=-1) + 1,
    )


# Room left on the disk beyond the entry's own size: the hash indexes, manifest and temporary files.
SPACE_MARGIN = 1.02


def _check_space(entry: Entry, plan: ExtractPlan, rows: int) -> None:
    """Say how many bytes the append will add, and refuse it when the disk cannot hold them."""
    need = rows * plan.bytes_per_row()
    free = shutil.disk_usage(entry.path).free
    log.info(
        "%d texts to compute: the entry grows by %s (%s per text: %d layers x %d poolings x %d "
        "values); %s free on its disk",
        rows,
        _size(need),
        _size(plan.bytes_per_row()),
        len(plan.layers),
        len(plan.poolings),
        plan.info.hidden_size,
        _size(free),
    )
    if need * SPACE_MARGIN > free:
        raise CacheRootError(
            f"the cache entry for {plan.backbone.name} needs {_size(need)} more for {rows} texts, "
            f"but the disk holding {entry.root} has {_size(free)} free; free space, point "
            "cache.root (LLMEMBED_CACHE) at a larger disk, or store fewer layers or poolings "
            "(extract.layers=[...], extract.poolings=[...])"
        )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


# Texts planned at once: one plan sorts and batches up to this many, then they are committed.
WINDOW = 1_000_000


def _fill(plan: ExtractPlan, append: Append, request: Request, ranks: Ranks) -> EmbedStats:
    """Every process computes its share of the new shards, window by window; the main process plans
    each window and commits it."""
    from llmembed.extract.embed import load_embedder  # torch: imported only when computing

    writer = EntryWriter(Entry(append.path), key=plan.key)
    device = ranks.device if plan.device == "auto" else plan.device
    gpus = [int(device.split(":")[1]) if ":" in device else 0] if device.startswith("cuda") else []
    windows = [append.rest[i : i + WINDOW] for i in range(0, len(append.rest), WINDOW)]
    extractor, index, work = None, append.next_index, EmbedStats()
    for w, part in enumerate(windows or [append.rest]):
        stats = EmbedStats()
        with Meter(gpus, cpu_energy=ranks.is_local_main) as meter:
            if extractor is None:
                extractor, stats.load_seconds = load_embedder(plan, device)
            todo = None
            if ranks.is_main:
                kept = list(append.kept) if w == 0 else []
                todo, index = _plan_window(plan, extractor, writer, request, kept, part, index)
            todo, extractor.token_budget = ranks.broadcast((todo, extractor.token_budget))
            mine = todo[ranks.index :: ranks.count]
            stats.add(_compute(plan, writer, extractor, mine, request))
        parts = ranks.gather((stats, meter.figures()))
        window = EmbedStats()
        for part_stats, _ in parts:
            window.add(part_stats)
        work.add(window)
        ranks.barrier()  # every shard of the window is on disk
        if ranks.is_main:
            entry = writer.entry
            base = entry.manifest if entry.complete else None
            wide = {p for info in writer.done().values() for p in info.wide}
            writer.commit(
                base=base,
                fields=_manifest_fields(plan, base, wide),
                extraction=_extraction_record(
                    window, device, request.name, combine([f for _, f in parts])
                ),
            )
        ranks.barrier()  # the manifest is on disk before any process goes on
    return work


# Texts tokenized at once while planning: only their lengths are kept, so planning a window costs
# a few bytes a text, not its tokens (those are made again shard by shard, ahead of the model).
PLAN_CHUNK = 8192


def _plan_window(plan, extractor, writer, request, kept, part, index):
    """The window's shards (the kept ones first), written as the pending plan before any forward
    pass; those still to compute; the next shard index."""
    lengths = np.zeros(len(part), dtype=np.int64)
    for start in range(0, len(part), PLAN_CHUNK):
        chunk = part[start : start + PLAN_CHUNK]
        lengths[start : start + len(chunk)] = extractor.tokenize(
            [request.texts[i] for i in chunk]
        ).lengths
    extractor.token_budget = resolve_token_budget(
        plan.token_budget,
        extractor.device,
        plan.info,
        row_bytes=plan.bytes_per_row(float32=True),
        mean_tokens=float(lengths.mean()) if len(lengths) else 1.0,
    )
    batches = plan_batches(lengths, extractor.token_budget, extractor.max_padding)
    per_shard = max(1, int(shard_bytes(plan.shard_mb, extractor.device)) // plan.bytes_per_row())
    shards = list(kept)
    for numbers in cut_shards([len(b) for b in batches], per_shard):
        rows = np.concatenate([batches[b] for b in numbers])
        shards.append(
            PlannedShard(index, request.hashes[part[rows]], tuple(len(batches[b]) for b in numbers))
        )
        index += 1
    writer.set_pending(shards)
    done = writer.done()
    return [s for s in shards if s.index not in done], index


def _compute(plan, writer, extractor, shards, request: Request) -> EmbedStats:
    """Run the model over this process's shards of a window and write each as it finishes."""
    from llmembed.extract.stream import Stream  # torch: imported only when computing

    def tokens_of(i: int) -> Tokens:
        return extractor.tokenize(request.texts_of(shards[i].hashes))

    def write(shard: PlannedShard, arrays: dict[str, np.ndarray]) -> None:
        writer.write_shard(
            shard.index,
            hashes=shard.hashes,
            emb=arrays,
            layers=plan.stored,
            num_layers=plan.info.num_layers,
        )

    with tqdm(
        total=sum(s.rows for s in shards),
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

        stream = Stream(extractor, extractor.out_dtype, write, on_batch=on_batch)
        try:
            request.stop_here()
            stats = stream.run(shards, tokens_of)
        except KeyboardInterrupt as err:
            stream.close()  # the shard being written is kept: it is complete, or not there at all
            raise Interrupted(
                f"interrupted ({getattr(err, 'signal_name', 'SIGINT')}): {len(writer.done())} of "
                f"{len(writer.pending())} new shards are complete in {writer.entry.path}; rerun "
                "the same command to resume with the rest",
                getattr(err, "signal_number", signal.SIGINT),
            ) from None
        finally:
            stream.close()
    if stream.replanned:
        stats.replanned = dict(stream.replanned)
    if stats.truncated:
        log.info(
            "%d texts were longer than %d tokens and truncated",
            stats.truncated,
            plan.spec.max_length,
        )
    return stats


def _manifest_fields(plan: ExtractPlan, base: Manifest | None, widened: set[str]) -> dict:
    """Per pooling its dtype: float32 where any shard stores it so (values beyond the store dtype's
    range in a shard of this append, `widened`, or of an earlier one), else the store dtype."""
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
        **({"replanned_batches": stats.replanned} if stats.replanned else {}),
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
    from llmembed.data.datasets import dataset_texts
    from llmembed.extract.command import extract_command

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
