"""The embedding of a continuous condition vector ``c`` (B, cond_dim) for classifier-free guidance.

A linear map of ``c`` into the network's embedding width, and one learned *null* embedding
for "no condition": a row of ``c`` that holds NaN (the objective's dropout writes NaN rows, as it
writes -1 for class labels), or ``c = None`` for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Condition:
    """What a network's ``label`` input carries: ``classes`` class indices (with one more, the
    *null* class, for classifier-free guidance), or a condition vector of ``dim`` numbers per row;
    neither (the default): the network is unconditional."""

    classes: int = 0
    dim: int = 0

    def __post_init__(self):
        if self.classes < 0 or self.dim < 0 or (self.classes and self.dim):
            raise ValueError(f"a condition is classes or a vector of dim numbers, not both; got {self}")


class CondEmbedding(nn.Module):
    def __init__(self, cond_dim: int, width: int):
        super().__init__()
        self.cond_dim = cond_dim
        self.proj = nn.Linear(cond_dim, width)
        self.null = nn.Parameter(torch.zeros(width))

    def forward(self, cond: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
        """(n, width): the embedding of each row of ``cond``; the null embedding where a row
        holds NaN or ``cond`` is None."""
        null = self.null.to(dtype).expand(n, -1)
        if cond is None:
            return null
        cond = cond.to(dtype).reshape(n, self.cond_dim)
        missing = torch.isnan(cond).any(1, keepdim=True)
        return torch.where(missing, null, self.proj(cond.nan_to_num(0.0)))


def as_condition(condition: Condition | int | None) -> Condition:
    """``None`` or 0: unconditional; an int: that many classes."""
    if isinstance(condition, Condition):
        return condition
    return Condition(classes=int(condition or 0))


def null_condition(label: torch.Tensor) -> torch.Tensor:
    """The "no condition" of a batch of labels (-1) or of condition vectors (NaN rows)."""
    return torch.full_like(label, float("nan") if label.is_floating_point() else -1)
