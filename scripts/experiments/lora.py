"""LoRA (Hu et al., 2021, "LoRA: Low-rank adaptation of large language models"), written here so
that the counterpart needs no extra dependency: chosen linear layers of a frozen model get a
trainable low-rank update, W x + (alpha / rank) · B A x, with B zero at the start so training starts
from the model as it is. Only A and B (and the classifier beside them) train."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """`base` (frozen) plus a rank-`rank` update scaled by `alpha / rank`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.base(x) + (self.dropout(x) @ self.A.T @ self.B.T) * self.scale


def add_lora(
    model: nn.Module, targets: list[str], *, rank: int, alpha: float, dropout: float = 0.0
) -> int:
    """Freeze `model` and wrap every nn.Linear whose attribute name is in `targets` (e.g. q_proj,
    v_proj of each attention block); returns how many were wrapped (none is an error: the names
    do not match this architecture)."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in targets and isinstance(child, nn.Linear)
    ]
    if not found:
        raise ValueError(f"no nn.Linear named {targets} in {type(model).__name__}")
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    return len(found)
