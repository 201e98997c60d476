"""Mask-aware pooling of hidden states, all layers and poolings from one forward pass.

Every pooling reads the attention mask, never the padding side: a text's embedding is the same
whether it was padded left or right, alone or beside longer texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LayerPooler:
    """Pools one layer at a time into {pooling: (B, layers, H) float32}, so that a layer's hidden
    state can be dropped as soon as it is pooled (`Extractor` calls `add` from inside the forward
    pass: memory does not grow with the number of stored layers).

    The float32 working copies are one layer's size, not all layers' (for SmolLM2 on a 1,024-token
    batch: 3.5 MB instead of 146 MB at the peak). `pooler` is not handled here: it needs the
    model's own pooler module (see `Extractor`)."""

    def __init__(self, mask: torch.Tensor, poolings: Sequence[str], layers: int) -> None:
        self.mask = mask.bool()  # (B, T)
        self.names = [p for p in poolings if p in ("mean", "last", "first")]
        self.layers = layers
        self.batch = torch.arange(mask.shape[0], device=mask.device)
        self.index = {"last": last_token_index(self.mask), "first": first_token_index(self.mask)}
        self.lengths = self.mask.sum(dim=1).clamp(min=1)[:, None]  # (B, 1)
        self.out: dict[str, torch.Tensor] = {}

    def add(self, j: int, h: torch.Tensor) -> None:
        """Pool hidden state `h` (B, T, H) into slot `j` of every pooling."""
        if not self.out:
            shape = (self.mask.shape[0], self.layers, h.shape[-1])
            self.out = {name: torch.empty(shape, device=h.device) for name in self.names}
        if "mean" in self.out:
            # masked_fill rather than a multiply: padded positions may hold NaN (fully masked
            # attention rows under left padding), and NaN * 0 is NaN.
            self.out["mean"][:, j] = (
                h.masked_fill(~self.mask[:, :, None], 0).float().sum(dim=1) / self.lengths
            )
        for name in ("last", "first"):
            if name in self.out:
                self.out[name][:, j] = h[self.batch, self.index[name]].float()


def pool_layers(
    hidden: Sequence[torch.Tensor], mask: torch.Tensor, poolings: list[str]
) -> dict[str, torch.Tensor]:
    """`hidden`: one (B, T, H) tensor per layer, `mask` (B, T) of 0/1 -> {pooling: (B, layers, H)
    float32}."""
    pooler = LayerPooler(mask, poolings, len(hidden))
    for j, h in enumerate(hidden):
        pooler.add(j, h)
    return pooler.out


def first_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's first real token, for either padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), -positions, -mask.shape[1]).argmax(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's last real token, for either padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).argmax(dim=1)
