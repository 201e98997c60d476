"""The extraction loop on a device: planned batches through the model, each finished on the device
and copied to host buffers without blocking the next, each shard written by a thread.

Per batch, on the device: the forward pass pools every stored layer (float32), the pooled values
are checked (finite, within the store dtype's range) and cast to the store dtype; a side stream
copies them into a pinned host buffer, layer by layer at the batch's rows of its shard, while the
model already computes the next batch. The feeding thread waits only for the oldest of `depth`
batches in flight. A shard whose last batch has arrived goes to the writer thread (which hashes and
writes without holding the GIL, see `llmembed.cache.files`); shard buffers are reused in a ring of
two, so host memory holds two shard buffers and the file image of the shard being written,
whatever the number of texts. On a CPU the same code runs synchronously.

A pooling whose values in a shard go beyond the store dtype's range is stored in float32 in that
shard (its earlier rows as the store dtype rounded them), so what a shard stores depends on its
planned batches alone: not on a resume, nor on how many processes share the work.
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
from llmembed.errors import UserError
from llmembed.extract.batching import Tokens, plan_batches
from llmembed.extract.stats import EmbedStats

log = logging.getLogger(__name__)

# Host arrays of a finished shard, {pooling: (layers, rows, hidden)} (layer-major: each layer's
# rows are one contiguous chunk of the file), valid until `write` returns.
WriteFn = Callable[[PlannedShard, dict[str, np.ndarray]], None]


class NotFiniteError(UserError, OverflowError):
    """The model's own computation overflowed (NaN or inf in a pooled embedding)."""


class DeviceMemoryError(UserError, RuntimeError):
    """A single text does not fit on the device."""


@dataclass
class _Batch:
    """A batch on its way to the host."""

    shard: int  # position in the run's shard list
    span: slice  # its rows in the shard
    pooled: dict[str, torch.Tensor]  # (B, layers, H) float32 on the device, kept for a widening
    flags: torch.Tensor  # (poolings, 2) bool on the host once `done`: [not finite, beyond range]
    done: torch.cuda.Event | None
    last: bool  # the shard's last batch


_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}


@dataclass
class _Buffer:
    """One shard's host arrays, {pooling: (layers, rows, H)}: on a GPU host pinned tensors that the
    copies fill (`pinned`) and numpy views of them; else numpy arrays, outside torch's allocator
    (so that they never count as activations)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    pinned: dict[str, torch.Tensor] = field(default_factory=dict)
    writing: Future | None = None

    def allocate(self, name: str, shape, dtype: torch.dtype, gpu: bool) -> None:
        if gpu:
            self.pinned[name] = torch.empty(shape, dtype=dtype, pin_memory=True)
            self.arrays[name] = self.pinned[name].numpy()
        else:
            self.arrays[name] = np.empty(shape, dtype=_NUMPY[dtype])

    def settle(self) -> None:
        """Wait for the write of the shard this buffer held (raising its error)."""
        writing, self.writing = self.writing, None
        if writing is not None:
            writing.result()


@dataclass
class Stream:
    """Runs an extractor over planned shards. `write(shard, arrays)` is called for each finished
    shard, in order, on the writer thread (or inline with `write_inline`)."""

    extractor: object  # llmembed.extract.embedder.Extractor
    out_dtype: torch.dtype  # the store dtype
    write: WriteFn
    depth: int = 3  # batches in flight between the device and the host
    write_inline: bool = False  # write on the feeding thread (to collect results in memory)
    on_batch: Callable[[int, int], None] | None = None  # (texts, real tokens) per batch
    replanned: dict[int, tuple[int, ...]] = field(default_factory=dict)  # shard index -> batches

    def __post_init__(self) -> None:
        self.device = torch.device(self.extractor.device)
        self.gpu = self.device.type == "cuda"
        self._copy = torch.cuda.Stream(self.device) if self.gpu else None
        self._flight: deque[_Batch] = deque()
        self._ring: list[_Buffer] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llmembed-write")
        self._failed = False  # a write failed: no later shard is written, the run stops
        self._cap: int | None = None  # padded tokens a batch may hold, after an out-of-memory
        self.stats = EmbedStats()

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, shards: Sequence[PlannedShard], tokens_of: Callable[[int], Tokens]) -> EmbedStats:
        """Compute and write every shard; `tokens_of(i)` gives shard i's tokens, row for row (it is
        called one shard ahead, on a thread, so tokenizing overlaps the forward passes)."""
        self._shards = list(shards)
        rows = max((s.rows for s in self._shards), default=0)
        self._ring = [_Buffer() for _ in range(min(2, len(self._shards)))]
        for buf in self._ring:
            self._reset(buf, rows)
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
            while self._flight:
                self._retire()
            for buf in self._ring:
                buf.settle()
        self.stats.seconds += time.perf_counter() - start
        return self.stats

    def close(self) -> None:
        """Let the write in flight end (a second Ctrl-C meanwhile is absorbed, so a shard being
        written is kept whole) and stop the writer thread. Its error is not raised here."""
        for buf in self._ring:
            while buf.writing is not None and not buf.writing.done():
                try:
                    wait([buf.writing])
                except KeyboardInterrupt:
                    continue
        self._pool.shutdown()

    def _run_shard(self, i: int, shard: PlannedShard, tokens: Tokens) -> None:
        buf = self._ring[i % len(self._ring)]
        # The shard that used this buffer two shards ago: its batches arrived, its write ended.
        while self._flight and self._flight[0].shard <= i - len(self._ring):
            self._retire()
        buf.settle()
        self._reset(buf, max(s.rows for s in self._shards))
        self.stats.texts += shard.rows
        self.stats.truncated += int(tokens.truncated.sum())
        spans = self._fit(shard, shard.spans(), tokens)
        k = 0
        while k < len(spans):
            self._raise_failed_write()
            span = spans[k]
            out_of_memory = False
            try:
                pooled = self._forward(tokens, span)
                self._send(i, span, pooled, buf, last=k == len(spans) - 1)
            except torch.OutOfMemoryError:
                out_of_memory = True  # handled below, once the failed batch's tensors are freed
            pooled = None  # held by the batch in flight only: freed when it reaches the host
            if out_of_memory:
                self._out_of_memory(span, tokens)
                spans[k:] = self._fit(shard, spans[k:], tokens, prefix=spans[:k])
                continue
            k += 1

    def _forward(self, tokens: Tokens, span: slice) -> dict[str, torch.Tensor]:
        ex = self.extractor
        rows = np.arange(span.start, span.stop)
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

    # --- out of memory -----------------------------------------------------------------------------
    def _out_of_memory(self, span: slice, tokens: Tokens) -> None:
        """A batch did not fit: from now on a batch holds at most half of its padded tokens."""
        rows = span.stop - span.start
        width = int(tokens.lengths[span].max())
        if rows == 1:
            raise DeviceMemoryError(
                f"out of memory on a single text of {width} tokens; lower extract.max_length or "
                "use a device with more memory"
            )
        self.stats.oom_retries += 1
        if self.gpu:
            torch.cuda.empty_cache()
        self._cap = max(width, rows * width // 2)
        log.warning(
            "out of memory on a batch of %d texts of up to %d tokens: batches of at most %d "
            "padded tokens from now on",
            rows,
            width,
            self._cap,
        )

    def _fit(self, shard: PlannedShard, spans: list[slice], tokens: Tokens, prefix=()):
        """`spans`, each split to the padded-token cap an out-of-memory set (none before one); a
        shard whose batches changed is recorded with its new batches."""
        if self._cap is None:
            return spans
        out = []
        for span in spans:
            lengths = tokens.lengths[span]
            if len(lengths) * int(lengths.max()) <= self._cap:
                out.append(span)
                continue
            # The rows are sorted longest first: plan_batches keeps them in order.
            for part in plan_batches(lengths, self._cap, self.extractor.max_padding):
                out.append(slice(span.start + int(part[0]), span.start + int(part[-1]) + 1))
        if len(out) != len(spans):
            self.replanned[shard.index] = tuple(s.stop - s.start for s in [*prefix, *out])
        return out

    # --- device to host ----------------------------------------------------------------------------
    def _reset(self, buf: _Buffer, rows: int) -> None:
        """A buffer for the next shard: every pooling in the store dtype again."""
        ex = self.extractor
        for name, count in ex.layer_counts().items():
            have = buf.arrays.get(name)
            if have is None or have.dtype != _NUMPY[self.out_dtype] or have.shape[1] < rows:
                buf.allocate(name, (count, rows, ex.hidden_size), self.out_dtype, self.gpu)

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
        """Into the buffer's rows of the batch, layer by layer (layer-major on the host)."""
        for name, x in batch.pooled.items():
            dtype = torch.float32 if buf.arrays[name].dtype == np.float32 else self.out_dtype
            y = (x if x.dtype == dtype else x.to(dtype)).transpose(0, 1)  # (layers, B, H)
            if self.gpu:
                y = y.contiguous()
                y.record_stream(self._copy)  # not reused by the allocator before the copies end
                dest = buf.pinned[name]
                for j in range(y.shape[0]):
                    dest[j, batch.span].copy_(y[j], non_blocking=True)
            else:
                buf.arrays[name][:, batch.span] = y.numpy()

    def _retire(self) -> None:
        """The oldest batch has reached the host: check its flags; hand its shard to the writer
        when it was the shard's last batch."""
        batch = self._flight.popleft()
        if batch.done is not None:
            batch.done.synchronize()
        buf = self._ring[batch.shard % len(self._ring)]
        for name, (not_finite, beyond) in zip(batch.pooled, batch.flags.tolist(), strict=True):
            if not_finite:
                raise NotFiniteError(
                    f"{name} embeddings hold NaN or infinite values: the model's own computation "
                    "overflowed; extract with `extract.dtype=float32` and `extract.store_dtype=float32`"
                )
            if beyond and buf.arrays[name].dtype != np.float32:
                self._widen(name, batch, buf)
        if batch.last:
            self._hand_over(batch.shard, buf)

    def _widen(self, name: str, batch: _Batch, buf: _Buffer) -> None:
        """Values beyond the store dtype's range ("massive activations", often 1e5 and more in the
        BOS state of LLMs, past float16's 65,504) would become inf: this shard stores the pooling in
        float32. Rare: its batches still in flight are copied again from their float32 values."""
        log.warning(
            "%s embeddings reach %.3g, beyond %s's range: shard %d stores them in float32",
            name,
            float(batch.pooled[name].abs().max()),
            str(self.out_dtype).removeprefix("torch."),
            self._shards[batch.shard].index,
        )
        self.stats.widened.add(name)
        if self.gpu:
            torch.cuda.synchronize(self.device)
        narrow = buf.arrays[name]
        buf.allocate(name, narrow.shape, torch.float32, self.gpu)
        buf.arrays[name][:] = narrow  # earlier rows: as the store dtype rounded them
        for b in (batch, *self._flight):
            if b.shard == batch.shard:
                buf.arrays[name][:, b.span] = b.pooled[name].transpose(0, 1).cpu().numpy()

    def _hand_over(self, i: int, buf: _Buffer) -> None:
        shard = self._shards[i]
        arrays = {name: a[:, : shard.rows] for name, a in buf.arrays.items()}
        if self.write_inline:
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
                buf.settle()


def embed_all(extractor, tokens: Tokens, out_dtype: torch.dtype, on_batch=None):
    """{pooling: (n, layers, hidden)} for every text of `tokens`, in their order, and the stats: the
    stream over one shard of all rows, batched as an extraction batches them."""
    batches = plan_batches(tokens.lengths, extractor.token_budget, extractor.max_padding)
    order = np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)
    shard = PlannedShard(0, np.zeros(len(order), dtype="S32"), tuple(len(b) for b in batches))
    out: dict[str, np.ndarray] = {}

    def keep(_, arrays):
        for name, values in arrays.items():  # (layers, rows, hidden) in batch order
            out[name] = np.empty((len(order), *values.shape[::2]), dtype=values.dtype)
            out[name][order] = values.transpose(1, 0, 2)  # back to the order of the texts

    stream = Stream(extractor, out_dtype, keep, write_inline=True, on_batch=on_batch)
    try:
        stats = stream.run([shard] if len(order) else [], lambda _: tokens.take(order))
    finally:
        stream.close()
    return out, stats
