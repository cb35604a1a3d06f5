"""Where every random draw comes from: a ``torch.Generator`` seeded from the user's seed, a named
stream and an index, so that draws of one kind never depend on how many of another were made, nor
on the order of the batches, the devices' memory or the number of processes sharing the work.

    generator(seed, "train", step)       training step ``step``: its data rows, noise, times, pairing,
                                         label dropout (one draw of the whole global batch, sliced)
    generator(seed, "sample", k)         the noise of sampling batch ``k`` (sample, eval, teacher pairs' shards)
    generator(seed, "sde", k)            batch ``k``'s Brownian path (its seed, for torchsde)
    generator(seed, "likelihood", k)     batch ``k``'s Hutchinson probes
    generator(seed, "reference", k)      draw ``k`` of real data to measure against
    generator(seed, "refresh", step)     MeanFlow's own trajectories, refreshed at ``step``
    generator(seed, "classes", c)        class ``c``'s samples in class-conditional measures and pictures
    generator(seed, "image-draw", k)     an image loader's draw ``k`` (rows and flips)

Seeds are mixed by NumPy's ``SeedSequence``: nearby (seed, stream, index) share nothing. Two things
are not draws and keep their fixed generators, because they define a data set and so a run's
meaning: the held-out rows of a table (chosen by its row count alone) and the notebook's fixed
points of a 2-D toy (``--n-points``, drawn with the run's seed).
"""

from __future__ import annotations

import numpy as np
import torch

#: the streams, each with its own number in the mixed seed (append new streams; never renumber)
STREAMS = {"train": 1, "sample": 2, "sde": 3, "likelihood": 4, "reference": 5, "refresh": 6, "classes": 7,
           "image-draw": 8, "eval": 9, "pairs-order": 10, "plot": 11, "floor": 12, "fid": 13}


def seed_of(seed: int, stream: str, *index: int) -> int:
    """The 63-bit seed of draw ``index`` of ``stream`` under the user's ``seed``."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    words = [int(seed) & (2**64 - 1), STREAMS[stream], *(int(i) & (2**64 - 1) for i in index)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, stream: str, *index: int, device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded by :func:`seed_of`."""
    return torch.Generator(device=device).manual_seed(seed_of(seed, stream, *index))


def noise(seed: int, k: int, n: int, shape, device="cpu") -> torch.Tensor:
    """Sampling batch ``k``'s ``n`` standard normal draws of ``shape``: (n, *shape) on ``device``."""
    g = generator(seed, "sample", k, device=device)
    return torch.randn(n, *shape, generator=g, device=g.device)


__all__ = ["STREAMS", "seed_of", "generator", "noise"]
