"""How an append's texts are batched and cut into shards, from their token lengths alone.

Texts are sorted longest first over the whole append (so an out-of-memory shows early and every
batch holds texts of similar length); a batch takes texts while its padded size stays within the
token budget and its padding within `max_padding` of its padded tokens; shards are cut at batch
boundaries once they hold `shard_rows` rows. So the batches do not depend on the shard size, and a
shard is a unit of storage, never of batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Padding a batch may hold, as a share of its padded tokens: length-sorted neighbours differ by a
# token or two, so the cap binds only where lengths spread out (the long tail, or a token budget
# large against the data), which is where unbounded batches padded 1.7x (MR on a GPU's budget).
MAX_PADDING = 0.05


def order_by_length(lengths: np.ndarray) -> np.ndarray:
    """Positions of the texts, longest first (ties in their given order)."""
    return np.argsort(-np.asarray(lengths), kind="stable")


def plan_batches(
    lengths: np.ndarray, budget: int, max_padding: float = MAX_PADDING
) -> list[np.ndarray]:
    """Positions into `lengths` per forward batch, longest texts first. A batch of one text is
    always allowed, even beyond the budget (the forward pass then says whether it fits)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = order_by_length(lengths)
    sorted_len = lengths[order]
    cum = np.concatenate([[0], np.cumsum(sorted_len)])
    batches = []
    i, n = 0, len(order)
    while i < n:
        width = int(max(sorted_len[i], 1))
        most = max(1, min(budget // width, n - i))
        k = np.arange(1, most + 1)  # candidate batch sizes
        real = cum[i + k] - cum[i]
        # Non-increasing lengths: padding only grows with k, so the largest k that fits is the cut.
        fits = real >= (1 - max_padding) * k * width
        take = int(k[fits][-1]) if fits.any() else 1
        batches.append(order[i : i + take])
        i += take
    return batches


def cut_shards(batch_rows: list[int], shard_rows: int) -> list[list[int]]:
    """Batch numbers per shard: consecutive batches until a shard holds `shard_rows` rows (a batch
    larger than that is a shard of its own)."""
    shards, current, rows = [], [], 0
    for b, n in enumerate(batch_rows):
        current.append(b)
        rows += n
        if rows >= shard_rows:
            shards.append(current)
            current, rows = [], 0
    if current:
        shards.append(current)
    return shards


@dataclass(frozen=True)
class Tokens:
    """Token ids of several texts, flat: text i is `ids[starts[i]:starts[i + 1]]`. int32 and flat,
    so that a million texts cost a few bytes per token, not Python lists."""

    ids: np.ndarray  # (total,) int32
    starts: np.ndarray  # (n + 1,) int64
    truncated: np.ndarray  # (n,) bool: cut at max_length

    @classmethod
    def from_lists(cls, ids: list[list[int]], truncated: np.ndarray) -> Tokens:
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        starts = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(starts[-1]))
        return cls(flat, starts, np.asarray(truncated, dtype=bool))

    def __len__(self) -> int:
        return len(self.truncated)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def take(self, rows: np.ndarray) -> Tokens:
        """The tokens of texts `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.empty(int(starts[-1]), dtype=np.int32)
        for r, text in enumerate(rows):
            ids[starts[r] : starts[r + 1]] = self.ids[self.starts[text] : self.starts[text + 1]]
        return Tokens(ids, starts, self.truncated[rows])

    def padded(self, rows: np.ndarray, side: str, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, attention mask), each (len(rows), longest) int64, padded on `side`."""
        lengths = self.lengths[rows]
        width = int(lengths.max())
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, (text, n) in enumerate(zip(rows, lengths, strict=True)):
            at = slice(width - n, width) if side == "left" else slice(0, n)
            input_ids[r, at] = self.ids[self.starts[text] : self.starts[text + 1]]
            mask[r, at] = 1
        return input_ids, mask
