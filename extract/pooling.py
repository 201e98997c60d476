"""Mask-aware pooling of hidden states, all layers and poolings from one forward pass.

Every pooling reads the attention mask, never the padding side: a text's embedding is the same
whether it was padded left or right, alone or beside longer texts.
"""

from __future__ import annotations

import torch


def pool_layers(
    hidden: torch.Tensor, mask: torch.Tensor, poolings: list[str]
) -> dict[str, torch.Tensor]:
    """`hidden` (layers, B, T, H), `mask` (B, T) of 0/1 -> {pooling: (B, layers, H) float32}.

    `pooler` is not handled here: it needs the model's own pooler module (see `Extractor`).
    """
    mask = mask.bool()
    out: dict[str, torch.Tensor] = {}
    if "mean" in poolings:
        # masked_fill rather than a multiply: padded positions may hold NaN (fully masked attention
        # rows under left padding), and NaN * 0 is NaN.
        summed = hidden.masked_fill(~mask[None, :, :, None], 0).float().sum(dim=2)  # (l, B, H)
        out["mean"] = (summed / mask.sum(dim=1).clamp(min=1)[None, :, None]).transpose(0, 1)
    batch = torch.arange(mask.shape[0], device=mask.device)
    for name, index in (("last", last_token_index), ("first", first_token_index)):
        if name in poolings:
            out[name] = hidden[:, batch, index(mask)].float().transpose(0, 1)  # (B, l, H)
    return out


def first_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's first real token, for either padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), -positions, -mask.shape[1]).argmax(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's last real token, for either padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).argmax(dim=1)
