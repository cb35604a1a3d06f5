"""The noise of batch ``k``: every batched draw (sampling, likelihood, teacher pairs) gives batch
``k`` its own generator, seeded from ``(seed, k)``, so a result depends only on the seed and the
batch size, not on the order of the batches or how many processes share them."""

from __future__ import annotations

import torch


def batch_generator(seed: int, k: int, device="cpu") -> torch.Generator:
    """The generator of batch ``k`` of a draw seeded with ``seed``, on ``device``."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + k)


def batch_noise(seed: int, k: int, n: int, shape, device="cpu") -> torch.Tensor:
    """``n`` standard normal draws of ``shape`` from :func:`batch_generator` on ``device``: (n, *shape)."""
    g = batch_generator(seed, k, device)
    return torch.randn(n, *shape, generator=g, device=g.device)
