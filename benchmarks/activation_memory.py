"""Peak bytes of tensors alive at once while a block of code runs, counted op by op.

CPU has no `torch.cuda.max_memory_allocated`; peak RSS is blurred by the allocator's caching.
This dispatch mode sees every tensor an op returns and is told when the last tensor on a storage
is freed, so it measures activations (weights are not made by ops, so they are not counted).

    with LiveTensors() as live:
        model(...)
    live.peak  # bytes
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensors(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0  # bytes alive now
        self.peak = 0  # most bytes alive at once
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors on it]
        self._tracked: dict[int, weakref.ref] = {}  # id(tensor) -> the tensor, weakly

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not self._known(t):
                self._track(t)
        return out

    def _known(self, t: torch.Tensor) -> bool:
        ref = self._tracked.get(id(t))
        return ref is not None and ref() is t

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if not size:
            return
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [size, 0]
            self.live += size
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        self._tracked[id(t)] = weakref.ref(t)
        weakref.finalize(t, self._release, key, id(t))

    def _release(self, key: int, ident: int) -> None:
        self._tracked.pop(ident, None)
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]
