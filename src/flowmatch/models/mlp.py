"""Time-conditioned MLP ``v(x, t)``; defaults are the article notebook's network.

Notebook design: ``Linear(D, W)`` on the input; a sinusoidal embedding of ``t * 10000``
(``W/2`` sines and ``W/2`` cosines) through ``Linear(W, W)`` is added to it; then ``depth``
blocks of ``[Linear(W, W), ReLU]``; ``Linear(W, D)`` out. With D = 2, W = 512, depth 5 it
has 1,578,498 parameters.

``film=True`` also scales and shifts every block's pre-activation by functions of the time
(FiLM, Perez et al. 2018; the adaptive norms of DiT do the same): ``ReLU(W h * (1 + g) + b)``,
``g, b`` per block from a 64-wide sinusoid of ``t`` (and of the interval ``h``) through
``Linear(., 64)`` and SiLU. A step's width can then shrink with ``1 - t`` by a product, which the
input's sum cannot give. The ``g, b`` layers start at zero: at init the network is the plain MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .cond import CondEmbedding, Condition, as_condition

#: FiLM's time sinusoid and hidden layer: 64 wide (+0.34 M parameters at width 512, depth 5)
FILM_DIM = 64


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of ``scale * t``: ``[sin(s t w_k), cos(s t w_k)]``,
    ``w_k = 10000^(-k / (dim/2))``. ``t`` (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class MLP(nn.Module):
    """``v(x, t[, label])`` for data ``x`` of shape (B, *shape) (flattened to ``dim`` inside);
    ``t`` of shape (B,).

    ``fourier``: that many random Fourier features of ``x`` beside it, or ``(features, scale)``
    with their frequencies' scale (default 1). ``condition``: class labels (an int: that many
    classes; a label embedding with one extra *null* class, index ``classes``, for
    classifier-free guidance) or a :class:`~flowmatch.models.cond.Condition` with ``dim``: a
    continuous condition vector per row as ``label`` (:class:`~flowmatch.models.cond.CondEmbedding`).
    """

    def __init__(self, dim: int, width: int = 512, depth: int = 5, time_scale: float = 10000.0,
                 fourier: int | tuple[int, float] = 0, interval: bool = False, film: bool = False,
                 condition: Condition | int | None = None):
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even integer >= 2, got {width}")
        fourier, fourier_scale = fourier if isinstance(fourier, tuple) else (fourier, 1.0)
        condition = as_condition(condition)
        num_classes, cond_dim = condition.classes, condition.dim
        self.dim, self.width, self.time_scale, self.num_classes = dim, width, time_scale, num_classes
        self.fourier = fourier
        if fourier:
            # Random Fourier features of x (Tancik et al. 2020): a fixed Gaussian frequency
            # matrix, drawn from its own generator so the network's init does not depend on it.
            freqs = torch.randn(dim, fourier, generator=torch.Generator().manual_seed(0)) * fourier_scale
            self.register_buffer("freqs", freqs)
        self.inp = nn.Linear(dim + 2 * fourier, width)
        self.time = nn.Linear(width, width)
        # average-velocity networks (MeanFlow): the interval h = t_end - t embedded beside t
        self.interval = nn.Linear(width, width) if interval else None
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.cond = CondEmbedding(cond_dim, width) if cond_dim else None
        self.blocks = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])
        self.out = nn.Linear(width, dim)
        self.film = None
        if film:  # made last, so the layers above are initialised as in the plain MLP of the same seed
            self.film_emb = nn.Sequential(nn.Linear(FILM_DIM * (2 if interval else 1), FILM_DIM), nn.SiLU())
            self.film = nn.ModuleList(nn.Linear(FILM_DIM, 2 * width) for _ in range(depth))
            for layer in self.film:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None,
                h: torch.Tensor | None = None) -> torch.Tensor:
        """The field at ``(x, t)``; with ``h`` (an interval network), the average velocity over
        ``[t, t + h]`` (``h = 0``, or None: the instantaneous velocity)."""
        shape = x.shape
        x = x.reshape(len(x), -1)
        feats = x
        if self.fourier:
            proj = 2 * math.pi * x @ self.freqs.to(x.dtype)
            feats = torch.cat([x, torch.sin(proj), torch.cos(proj)], dim=1)
        emb = self.inp(feats) + self.time(sinusoidal_embedding(t, self.width, self.time_scale).to(x.dtype))
        if self.interval is not None:
            h = torch.zeros_like(t) if h is None else h
            emb = emb + self.interval(sinusoidal_embedding(h, self.width, self.time_scale).to(x.dtype))
        if self.label is not None:
            if label is None:  # unconditional: the null class
                label = torch.full((len(x),), self.num_classes, device=x.device, dtype=torch.long)
            label = torch.where(label < 0, self.num_classes, label)  # -1 also means null
            emb = emb + self.label(label)
        if self.cond is not None:  # a continuous condition vector per row (``label`` (B, cond_dim))
            emb = emb + self.cond(label, len(x), x.dtype)
        if self.film is None:
            return self.out(self.blocks(emb)).reshape(shape)
        # FiLM's sinusoids: 64 sines cannot resolve the notebook's t * 10000, so at most t * 1000
        scale = min(self.time_scale, 1000.0)
        times = [t] if self.interval is None else [t, h]
        e = self.film_emb(torch.cat([sinusoidal_embedding(u, FILM_DIM, scale) for u in times], dim=1).to(x.dtype))
        for i, layer in enumerate(self.film):
            g, b = layer(e).chunk(2, dim=1)
            emb = torch.relu(self.blocks[2 * i](emb) * (1 + g) + b)
        return self.out(emb).reshape(shape)
