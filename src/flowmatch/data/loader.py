"""Training batches of images through ``torch.utils.data.DataLoader``, deterministic per draw.

Why this shape. A trainer's batches must not depend on how they are loaded (worker count,
prefetching, a kill and a resume), and the data must not live in the process's own memory. So:

- draw ``k`` (step ``k``'s global batch, the same on every process, which keeps its own parts) is
  a pure function of ``(seed, k)``: a generator seeded from the pair (:mod:`flowmatch.seeding`'s
  "image-draw" stream) picks the rows, with replacement, then the flips (``hflip``). No generator
  state is carried from one batch to the next, so a resumed run starts the stream at its
  checkpoint's step and sees exactly the batches an uninterrupted run saw;
- :class:`Draws` is a map-style dataset whose item ``k`` is that batch, and the sampler counts
  ``start, start + 1, ...``; the DataLoader hands the draws out to its workers and returns them
  in order, prefetching a few ahead of the training step;
- a worker reads its rows from the memory-mapped pixels (:class:`Pixels`: the uint8 cache, or a
  ``.npy`` as it is) and converts only them to float, so resident memory stays that of a few batches
  however large the data set (the mapped pages are the kernel's file cache, shared by all workers).

With ``workers=0`` the same items are computed in the training process: the same batches.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch

from ..seeding import generator

#: below this many training rows (or with the pixels in memory) batches load in the training process
SMALL = 10_000


class Pixels:
    """Rows of an image array as float32 in [0, 1]: uint8 pixels / 255, other dtypes converted.
    With ``file`` the array is memory-mapped from it, and pickled (a worker process started by
    ``spawn``) as the file's name, not as its contents."""

    def __init__(self, array: np.ndarray, file=None):
        self.array, self.file = array, file
        self.shape = tuple(array.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        return {**self.__dict__, "array": None} if self.file is not None else self.__dict__

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        if self.array is None:
            self.array = np.load(self.file, mmap_mode="r")
        x = torch.from_numpy(np.ascontiguousarray(self.array[idx]))
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


class Draws(torch.utils.data.Dataset):
    """Item ``k``: the ``k``-th training batch of stream ``seed``, ``{"x1": (B, C, H, W) in
    [-1, 1], "label": (B,)}`` (no label for unlabelled data). ``rows``: the training rows of
    ``pixels`` (held-out rows are simply not among them)."""

    def __init__(self, pixels: Pixels, rows: np.ndarray, labels: np.ndarray | None, batch_size: int, seed: int,
                 hflip: bool = False):
        self.pixels, self.rows, self.labels = pixels, rows, labels
        self.batch_size, self.seed, self.hflip = batch_size, seed, hflip

    def __getitem__(self, k: int) -> dict:
        g = generator(self.seed, "image-draw", k)
        pick = torch.randint(len(self.rows), (self.batch_size,), generator=g).numpy()
        rows = self.rows[pick]
        x = self.pixels.rows(rows)
        if self.hflip:  # each image mirrored left-right with probability 1/2
            flip = torch.rand(self.batch_size, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        batch = {"x1": (x - 0.5) / 0.5}  # the model's space, as ImageDataset.encode
        if self.labels is not None:
            batch["label"] = torch.from_numpy(self.labels[rows])
        return batch


class _CountFrom:
    """The sampler: draw numbers ``start, start + 1, ...`` without end."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def default_workers(rows: int, in_memory: bool) -> int:
    """``--workers`` left unset: none for small or in-memory data (a batch is microseconds of
    copying), else one per spare CPU core, at most 4."""
    if in_memory or rows < SMALL:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def batches(draws: Draws, start: int, workers: int, device):
    """The batches ``start, start + 1, ...`` of ``draws`` on ``device`` (pinned host memory on
    the way to a GPU), as ``(x1, label or None)``, loaded by ``workers`` processes."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(draws, batch_size=None, sampler=_CountFrom(start), num_workers=workers,
                                         pin_memory=cuda, prefetch_factor=4 if workers else None,
                                         generator=torch.Generator().manual_seed(0))  # not the global RNG's state
    for b in loader:
        label = b.get("label")
        yield b["x1"].to(device, non_blocking=cuda), (None if label is None else label.to(device, non_blocking=cuda))
