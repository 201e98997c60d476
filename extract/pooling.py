"""Mask-aware pooling of hidden states, all layers and poolings from one forward pass.

Every pooling reads the attention mask, never the padding side: a text's embedding is the same
whether it was padded left or right, alone or beside longer texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pool_layers(
    hidden: Sequence[torch.Tensor], mask: torch.Tensor, poolings: list[str]
) -> dict[str, torch.Tensor]:
    """`hidden`: one (B, T, H) tensor per layer, `mask` (B, T) of 0/1 -> {pooling: (B, layers, H)
    float32}.

    Layer by layer, so that the float32 working copies are one layer's size, not all layers' (for
    SmolLM2 on a 1,024-token batch: 3.5 MB instead of 146 MB at the peak).
    `pooler` is not handled here: it needs the model's own pooler module (see `Extractor`).
    """
    mask = mask.bool()
    batch = torch.arange(mask.shape[0], device=mask.device)
    index = {"last": last_token_index(mask), "first": first_token_index(mask)}
    lengths = mask.sum(dim=1).clamp(min=1)[:, None]
    out = {
        name: torch.empty((mask.shape[0], len(hidden), hidden[0].shape[-1]), device=mask.device)
        for name in poolings
        if name in ("mean", "last", "first")
    }
    for j, h in enumerate(hidden):
        if "mean" in out:
            # masked_fill rather than a multiply: padded positions may hold NaN (fully masked
            # attention rows under left padding), and NaN * 0 is NaN.
            out["mean"][:, j] = h.masked_fill(~mask[:, :, None], 0).float().sum(dim=1) / lengths
        for name in ("last", "first"):
            if name in out:
                out[name][:, j] = h[batch, index[name]].float()
    return out


def first_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's first real token, for either padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), -positions, -mask.shape[1]).argmax(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's last real token, for either padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).argmax(dim=1)
