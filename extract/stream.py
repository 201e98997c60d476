"""The extraction loop on a device: planned batches through the model, each finished on the device
and copied to host buffers without blocking the next, each shard written by a thread.

Per batch, on the device: the forward pass pools every stored layer (float32), the pooled values
are checked (finite, within the store dtype's range) and cast to the store dtype; a side stream
copies them into a pinned host buffer, at the batch's rows of its shard, while the model already
computes the next batch. The feeding thread waits only for the oldest of `depth` batches in flight.
A shard whose last batch has arrived goes to a writer thread (which hashes and writes without
holding the GIL, see `llmembed.cache.files`); shard buffers are reused in a ring, so host memory
holds at most `buffers` shards whatever the number of texts. On a CPU the same code runs
synchronously.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import torch

from llmembed.cache.format import PlannedShard
from llmembed.extract.batching import Tokens, plan_batches
from llmembed.extract.stats import EmbedStats

log = logging.getLogger(__name__)

# Host arrays of a finished shard, {pooling: (rows, layers, hidden)}, valid until `write` returns.
WriteFn = Callable[[PlannedShard, dict[str, np.ndarray]], None]


class NotFiniteError(OverflowError):
    """The model's own computation overflowed (NaN or inf in a pooled embedding)."""


@dataclass
class _Batch:
    """A batch on its way to the host."""

    shard: int  # position in the run's shard list
    span: slice  # its rows in the shard
    pooled: dict[str, torch.Tensor]  # (B, layers, H) float32 on the device, kept for a widening
    flags: torch.Tensor  # (poolings, 2) bool on the host once `done`: [not finite, beyond range]
    done: torch.cuda.Event | None
    last: bool  # the shard's last batch


@dataclass
class _Buffer:
    """One shard's host arrays, {pooling: (rows, layers, H)}: on a GPU host pinned tensors that the
    copies fill (`pinned`) and numpy views of them; else numpy arrays, outside torch's allocator
    (so that they never count as activations)."""

    arrays: dict[str, np.ndarray]
    pinned: dict[str, torch.Tensor]
    writing: Future | None = None

    def allocate(self, name: str, shape, dtype: torch.dtype, gpu: bool) -> None:
        if gpu:
            self.pinned[name] = torch.empty(shape, dtype=dtype, pin_memory=True)
            self.arrays[name] = self.pinned[name].numpy()
        else:
            self.arrays[name] = np.empty(shape, dtype=_NUMPY[dtype])


_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}


@dataclass
class Stream:
    """Runs an extractor over planned shards. `write(shard, arrays)` is called on a writer thread
    (inline where `writers` is 0) for each finished shard, in order."""

    extractor: object  # llmembed.extract.embedder.Extractor
    out_dtype: torch.dtype  # the store dtype
    write: WriteFn
    depth: int = 3  # batches in flight between the device and the host
    buffers: int = 2  # shards held on the host: one filling, the others being written
    writers: int = 1
    on_batch: Callable[[int, int], None] | None = None  # (texts, real tokens) per batch
    widened: set[str] = field(default_factory=set)  # poolings stored in float32 from now on
    replanned: dict[int, tuple[int, ...]] = field(default_factory=dict)  # shard index -> batches

    def __post_init__(self) -> None:
        self.device = torch.device(self.extractor.device)
        self.gpu = self.device.type == "cuda"
        self._copy = torch.cuda.Stream(self.device) if self.gpu else None
        self._flight: deque[_Batch] = deque()
        self._ring: list[_Buffer] = []
        self._pool = ThreadPoolExecutor(max(self.writers, 1), thread_name_prefix="llmembed-write")
        self._failed = False  # a write failed: no later shard is written, the run stops
        self.stats = EmbedStats()

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, shards: Sequence[PlannedShard], tokens_of: Callable[[int], Tokens]) -> EmbedStats:
        """Compute and write every shard; `tokens_of(i)` gives shard i's tokens, row for row (it is
        called one shard ahead, on a thread, so tokenizing overlaps the forward passes)."""
        self._shards = list(shards)
        rows = max((s.rows for s in self._shards), default=0)
        self._ring = [self._buffer(rows) for _ in range(min(self.buffers, len(self._shards)))]
        start = time.perf_counter()
        with (
            torch.inference_mode(),
            ThreadPoolExecutor(1, thread_name_prefix="llmembed-tokenize") as ahead,
        ):
            nxt = ahead.submit(tokens_of, 0) if self._shards else None
            for i, shard in enumerate(self._shards):
                tokens = nxt.result()
                if i + 1 < len(self._shards):
                    nxt = ahead.submit(tokens_of, i + 1)
                assert len(tokens) == shard.rows, (len(tokens), shard.rows)
                self._run_shard(i, shard, tokens)
            self._drain()
            self._wait_writes()
        self.stats.seconds += time.perf_counter() - start
        self.stats.widened = set(self.widened)
        return self.stats

    def close(self) -> None:
        """Let writes in flight end (a second Ctrl-C meanwhile is absorbed, so a shard being written
        is kept whole) and stop the writer threads. Errors of those writes are not raised here."""
        for buf in self._ring:
            while buf.writing is not None and not buf.writing.done():
                try:
                    wait([buf.writing])
                except KeyboardInterrupt:
                    continue
        self._pool.shutdown()

    def _run_shard(self, i: int, shard: PlannedShard, tokens: Tokens) -> None:
        buf = self._ring[i % len(self._ring)]
        # The shard that used this buffer `buffers` shards ago: its batches arrived, its write ended.
        while self._flight and self._flight[0].shard <= i - len(self._ring):
            self._retire()
        if buf.writing is not None:
            buf.writing.result()
            buf.writing = None
        self.stats.texts += shard.rows
        self.stats.truncated += int(tokens.truncated.sum())
        spans = shard.spans()
        k = 0
        while k < len(spans):
            self._raise_failed_write()
            span = spans[k]
            rows = np.arange(span.start, span.stop)
            try:
                pooled = self._forward(tokens, rows)
            except torch.OutOfMemoryError:
                spans[k : k + 1] = self._split(shard, spans, k, tokens)
                continue
            self._send(i, span, pooled, buf, last=k == len(spans) - 1)
            del pooled  # held by the batch in flight only: freed when it reaches the host
            k += 1

    def _forward(self, tokens: Tokens, rows: np.ndarray) -> dict[str, torch.Tensor]:
        ex = self.extractor
        ids, mask = tokens.padded(rows, ex.padding_side, ex.tokenizer.pad_token_id)
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.gpu:
            ids_t = ids_t.pin_memory().to(self.device, non_blocking=True)
            mask_t = mask_t.pin_memory().to(self.device, non_blocking=True)
        pooled = ex.forward(ids_t, mask_t)
        real = int(mask.sum())
        self.stats.tokens += real
        self.stats.padded_tokens += int(mask.size)
        self.stats.forward_calls += 1
        if self.on_batch is not None:
            self.on_batch(len(rows), real)
        return pooled

    def _split(
        self, shard: PlannedShard, spans: list[slice], k: int, tokens: Tokens
    ) -> list[slice]:
        """Out of memory on batch k: re-plan its rows at half the budget, record the shard's new
        batches and say so."""
        span = spans[k]
        if span.stop - span.start == 1:
            width = int(tokens.lengths[span.start])
            raise RuntimeError(
                f"out of memory on a single text of {width} tokens; lower extract.max_length or "
                "use a device with more memory"
            ) from None
        self.stats.oom_retries += 1
        if self.gpu:
            torch.cuda.empty_cache()
        ex = self.extractor
        ex.token_budget = max(1, ex.token_budget // 2)
        part = plan_batches(tokens.lengths[span.start : span.stop], ex.token_budget, ex.max_padding)
        # plan_batches keeps the length order of rows already sorted longest first.
        new = [slice(span.start + int(b[0]), span.start + int(b[-1]) + 1) for b in part]
        assert sum(s.stop - s.start for s in new) == span.stop - span.start
        batches = [s.stop - s.start for s in spans[:k] + new + spans[k + 1 :]]
        self.replanned[shard.index] = tuple(batches)
        log.warning(
            "out of memory on a batch of %d texts of up to %d tokens: token budget halved to %d; "
            "shard %d re-planned into %d batches",
            span.stop - span.start,
            int(tokens.lengths[span].max()),
            ex.token_budget,
            shard.index,
            len(batches),
        )
        return new

    # --- device to host ----------------------------------------------------------------------------
    def _buffer(self, rows: int) -> _Buffer:
        ex = self.extractor
        buf = _Buffer({}, {})
        for name, count in ex.layer_counts().items():
            dtype = torch.float32 if name in self.widened else self.out_dtype
            buf.allocate(name, (rows, count, ex.hidden_size), dtype, self.gpu)
        return buf

    def _send(self, i: int, span: slice, pooled: dict[str, torch.Tensor], buf: _Buffer, last: bool):
        """Finish a batch on the device and start its copy into the shard's host buffer."""
        limit = torch.finfo(self.out_dtype).max
        checks = []
        for x in pooled.values():
            low, high = torch.aminmax(x)  # NaN propagates; no temporary of x's size
            extreme = torch.maximum(-low, high)
            checks.append(torch.stack([~torch.isfinite(extreme), extreme > limit]))
        flags = torch.stack(checks)  # (poolings, 2) on the device
        if not self.gpu:
            batch = _Batch(i, span, pooled, flags, None, last)
            self._copy_batch(batch, buf)
            self._flight.append(batch)
            self._retire()
            return
        self._copy.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy):
            host_flags = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            host_flags.copy_(flags, non_blocking=True)
            flags.record_stream(self._copy)
            batch = _Batch(i, span, pooled, host_flags, None, last)
            self._copy_batch(batch, buf)
            batch.done = torch.cuda.Event()
            batch.done.record(self._copy)
        self._flight.append(batch)
        while len(self._flight) > self.depth:
            self._retire()

    def _copy_batch(self, batch: _Batch, buf: _Buffer) -> None:
        for name, x in batch.pooled.items():
            dtype = torch.float32 if name in self.widened else self.out_dtype
            y = x if x.dtype == dtype else x.to(dtype)
            if self.gpu:
                y.record_stream(self._copy)  # not reused by the allocator before the copy ends
                buf.pinned[name][batch.span].copy_(y, non_blocking=True)
            else:
                buf.arrays[name][batch.span] = y.numpy()

    def _retire(self) -> None:
        """The oldest batch has reached the host: check its flags; hand its shard to a writer when
        it was the shard's last batch."""
        batch = self._flight.popleft()
        if batch.done is not None:
            batch.done.synchronize()
        flags = batch.flags.tolist()
        for name, (not_finite, beyond) in zip(batch.pooled, flags, strict=True):
            if not_finite:
                raise NotFiniteError(
                    f"{name} embeddings hold NaN or infinite values: the model's own computation "
                    "overflowed; extract with `extract.dtype=float32` and `extract.store_dtype=float32`"
                )
            if beyond and name not in self.widened:
                self._widen(name, batch)
        if batch.last:
            self._hand_over(batch.shard)

    def _widen(self, name: str, batch: _Batch) -> None:
        """Values beyond the store dtype's range ("massive activations", often 1e5 and more in the
        BOS state of LLMs, past float16's 65,504) would become inf: keep this pooling in float32 for
        the rest of the run, so that every later shard stores it the same way. Rare: the batches
        in flight are copied again from their float32 values."""
        self.widened.add(name)
        log.warning(
            "%s embeddings reach %.3g, beyond %s's range: storing them in float32",
            name,
            float(batch.pooled[name].abs().max()),
            str(self.out_dtype).removeprefix("torch."),
        )
        if self.gpu:
            torch.cuda.synchronize(self.device)
        for buf in self._ring:
            if buf.writing is not None:
                buf.writing.result()
                buf.writing = None
            narrow = buf.arrays[name]
            buf.allocate(name, narrow.shape, torch.float32, self.gpu)
            buf.arrays[name][:] = narrow  # rows so far: exact
        for b in [batch, *self._flight]:
            dest = self._ring[b.shard % len(self._ring)].arrays[name]
            dest[b.span] = b.pooled[name].cpu().numpy()

    def _drain(self) -> None:
        while self._flight:
            self._retire()

    def _hand_over(self, i: int) -> None:
        shard = self._shards[i]
        buf = self._ring[i % len(self._ring)]
        arrays = {name: a[: shard.rows] for name, a in buf.arrays.items()}
        if self.writers == 0:
            self.write(shard, arrays)
        else:
            buf.writing = self._pool.submit(self._write, shard, arrays)

    def _write(self, shard: PlannedShard, arrays: dict[str, np.ndarray]) -> None:
        if self._failed:
            return  # an earlier shard's write failed: its error stops the run
        try:
            self.write(shard, arrays)
        except BaseException:
            self._failed = True
            raise

    def _raise_failed_write(self) -> None:
        """A write's error reaches the feeding thread at the next batch, not a shard later."""
        for buf in self._ring:
            if buf.writing is not None and buf.writing.done() and buf.writing.exception():
                buf.writing.result()

    def _wait_writes(self) -> None:
        for buf in self._ring:
            if buf.writing is not None:
                buf.writing.result()
                buf.writing = None


def embed_all(extractor, tokens: Tokens, out_dtype: torch.dtype, on_batch=None):
    """{pooling: (n, layers, hidden)} for every text of `tokens`, in their order, and the stats: the
    stream over one shard of all rows, batched as an extraction batches them."""
    batches = plan_batches(tokens.lengths, extractor.token_budget, extractor.max_padding)
    order = np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)
    shard = PlannedShard(0, np.zeros(len(order), dtype="S32"), tuple(len(b) for b in batches))
    out: dict[str, np.ndarray] = {}

    def keep(_, arrays):
        for name, values in arrays.items():
            out[name] = np.empty_like(values)
            out[name][order] = values  # back to the order of the texts

    stream = Stream(extractor, out_dtype, keep, writers=0, on_batch=on_batch)
    try:
        stats = stream.run([shard] if len(order) else [], lambda _: tokens.take(order))
    finally:
        stream.close()
    return out, stats
