"""Where the data ``x1`` come from.

A dataset is built from a small JSON-able *spec* (saved in ``config.json``) and offers:

- ``sample(n, generator) -> Batch``: a training batch in model space (normalised);
- ``reference(n, generator)``: fresh samples in the data's own units, for evaluation;
- ``encode``/``decode``: data units <-> model space (identity for the 2-D toys).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SettingError, UserError
from .arrays import ARRAY_SUFFIXES, load_table, parse_columns
from .toy2d import TOY2D

#: labelled images shipped inside packages, with a fixed held-out split (data/images.py)
EMBEDDED_IMAGES = ("digits", "mnist")


@dataclass
class Batch:
    """A training batch: data ``x1``; noise ``x0`` when the data come paired (reflow); labels."""

    x1: torch.Tensor
    x0: torch.Tensor | None = None
    label: torch.Tensor | None = None


class Dataset:
    """Base class. ``shape`` is one sample's shape; ``num_classes`` is 0 for unlabelled data;
    ``cond_dim`` is the length of a continuous condition vector per sample (0: none)."""

    shape: tuple = ()
    num_classes: int = 0
    cond_dim: int = 0
    spec: dict = {}

    def __init__(self):
        self.mean = torch.zeros(())
        self.std = torch.ones(())

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def reference(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    #: whether the data has rows that never train (False: the 2-D toys draw fresh points; a table
    #: too small to hold any out measures on its training rows)
    held_out: bool = False

    def distinct_rows(self, split: str, n: int, generator: torch.Generator) -> torch.Tensor:
        """Up to ``n`` different rows of ``split`` ("train" or "held-out"; all of them when it has
        fewer; the training rows stand in for held-out ones where none are held out), in the data's
        units, chosen with ``generator`` (CPU)."""
        raise UserError(f"{self.spec.get('name', 'this data set')}: draws fresh samples; it has no finite rows to compare with")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)

    def to(self, device) -> Dataset:
        return self


class ToyDataset(Dataset):
    """A 2-D toy distribution; with ``n_points`` a fixed finite set drawn once with ``seed``."""

    shape = (2,)

    def __init__(self, name: str, n_points: int | None = None, seed: int = 0):
        super().__init__()
        if name not in TOY2D:
            raise SettingError("data", f"unknown data set {name!r}; expected one of {', '.join(valid_names())} or a file")
        if n_points is not None and n_points < 2:
            raise SettingError("n_points", f"expected an integer >= 2, got {n_points}")
        self.name, self.n_points, self.seed = name, n_points, int(seed)
        self.sampler = TOY2D[name]
        self.points = None
        if n_points is not None:
            self.points = self.sampler(n_points, torch.Generator().manual_seed(self.seed))
        self.spec = {"name": name, "n_points": n_points, "seed": self.seed}

    def to(self, device):
        if self.points is not None:
            self.points = self.points.to(device)
        return self

    def sample(self, n, generator):
        if self.points is None:
            return Batch(self.sampler(n, generator))
        idx = torch.randint(len(self.points), (n,), generator=generator, device=generator.device)
        return Batch(self.points.to(generator.device)[idx])

    def reference(self, n, generator):
        # Quality is measured against the continuous distribution the points come from.
        return self.sampler(n, generator)


def split_rows(n: int, holdout: float, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed split of ``n`` rows into (training, held-out) indices: a share ``holdout`` of
    them, chosen by a permutation that depends only on ``n`` (the same for every run and seed).
    Too few rows to hold any out: every row trains, and evaluation uses them (with a warning)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    k = int(n * holdout)
    if holdout > 0 and k == 0:
        warnings.warn(f"{where}: {n} rows are too few to hold out {holdout:g} of them; "
                      "eval and nll measure on the training rows", stacklevel=3)
    return perm[k:].sort().values, perm[:k].sort().values


class ArrayDataset(Dataset):
    """Rows of a user array (N, D), standardised per column for training. A fixed share
    ``holdout`` of the rows never trains: :meth:`reference` (eval, nll) draws from them.

    With a condition vector per row (``cond_columns`` of a table, or an .npz file's ``cond``),
    batches carry it, standardised too, as their ``label`` (``cond_dim`` > 0)."""

    def __init__(self, path: str, mean=None, std=None, holdout: float = 0.0, cond_columns: list[int] | None = None,
                 cond_mean=None, cond_std=None):
        super().__init__()
        self.path = os.path.abspath(path)
        self.holdout = float(holdout)  # runs written before the split existed: 0 (every row trains)
        self.cond_columns = list(cond_columns) if cond_columns else None
        self.data = self.held = self.cond = None
        if mean is None or std is None:
            self._rows()
            mean, std = _standardisation(self.data, self.path)
            if self.cond is not None:
                cond_mean, cond_std = _standardisation(self.cond, self.path)
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.shape = (len(self.mean),)
        self.spec = {"name": "array", "path": self.path, "mean": self.mean.tolist(), "std": self.std.tolist(),
                     "holdout": self.holdout}
        self.cond_mean = self.cond_std = None
        if cond_mean is not None:
            self.cond_mean = torch.as_tensor(cond_mean, dtype=torch.float32)
            self.cond_std = torch.as_tensor(cond_std, dtype=torch.float32)
            self.cond_dim = len(self.cond_mean)
            self.spec |= {"cond_columns": self.cond_columns, "cond_mean": self.cond_mean.tolist(),
                          "cond_std": self.cond_std.tolist()}

    # in float64: x - mean of float32 values near ±3e38 would overflow float32
    def encode(self, x):
        return ((x.double() - self.mean.to(x.device).double()) / self.std.to(x.device).double()).to(x.dtype)

    def decode(self, x):
        return (x.double() * self.std.to(x.device).double() + self.mean.to(x.device).double()).to(x.dtype)

    def encode_cond(self, c):
        return ((c.double() - self.cond_mean.to(c.device).double()) / self.cond_std.to(c.device).double()).float()

    def _rows(self) -> torch.Tensor:
        """The training rows (loading the file and splitting off the held-out rows once)."""
        if self.data is None:
            rows, cond = load_table(self.path, self.cond_columns)
            if self.shape and tuple(rows.shape[1:]) != self.shape:
                raise UserError(f"{self.path}: rows have shape {tuple(rows.shape[1:])}, the run expects {self.shape}")
            if self.cond_dim and (cond is None or cond.shape[1] != self.cond_dim):
                found = "none" if cond is None else cond.shape[1]
                raise UserError(f"{self.path}: the run expects {self.cond_dim} condition(s) per row, the file has {found}")
            train, held = split_rows(len(rows), self.holdout, self.path)
            self.data, self.held = rows[train], (rows[held] if len(held) else rows[train])
            self._held_out = len(held) > 0
            self.cond = None if cond is None else cond[train]
        return self.data

    def to(self, device):
        self.data, self.held = self._rows().to(device), self.held.to(device)
        if self.cond is not None:
            self.cond = self.cond.to(device)
        return self

    def sample(self, n, generator):
        rows = self._rows()
        idx = torch.randint(len(rows), (n,), generator=generator, device=generator.device)
        cond = None if self.cond is None else self.encode_cond(self.cond.to(generator.device)[idx])
        return Batch(self.encode(rows.to(generator.device)[idx]), label=cond)

    def reference(self, n, generator):
        """Held-out rows (the training rows where the table was too small to hold any out),
        drawn with replacement, in the data's units."""
        self._rows()
        idx = torch.randint(len(self.held), (n,), generator=generator, device=generator.device)
        return self.held.to(generator.device)[idx]

    @property
    def held_out(self) -> bool:
        self._rows()
        return self._held_out

    def distinct_rows(self, split, n, generator):
        self._rows()
        rows = self.data if split == "train" else self.held
        return rows.cpu()[torch.randperm(len(rows), generator=generator)[:n]]


def _standardisation(data: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and standard deviation (computed in float64), which must fit float32."""
    mean, std = data.double().mean(0), data.double().std(0).clamp_min(1e-8)
    if not (torch.isfinite(mean.float()).all() and torch.isfinite(std.float()).all()):
        raise UserError(f"{path}: the columns' spread exceeds float32's range (±3.4e38); expected smaller values")
    return mean, std


class ImageDataset(Dataset):
    """Images in [0, 1] (N, C, H, W) with optional labels; the model sees ``2 x - 1``.

    Loaded lazily: a run rebuilt for sampling needs only the spec (shape, classes). The pixels are
    one array, never copied: image folders and CIFAR-10 decoded once into the uint8 cache and
    memory-mapped (data/cache.py), a ``.npy`` memory-mapped as it is, digits and mnist in memory.
    Training and held-out rows are index arrays into it. Training batches come from :meth:`loader`
    (a DataLoader, deterministic per draw: data/loader.py); :meth:`sample` draws from a generator."""

    def __init__(self, name: str, path: str | None = None, image_size: int | None = None, skip_bad: bool = False,
                 shape=None, num_classes: int | None = None, classes=None, holdout: float = 0.0):
        super().__init__()
        self.name, self.path, self.image_size, self.skip_bad = name, path, image_size, skip_bad
        self.holdout = float(holdout)  # user images: the share held out for eval (digits, mnist, cifar10: their test splits)
        self.mean, self.std = torch.tensor(0.5), torch.tensor(0.5)
        self.pixels = self.labels = None
        self.classes = classes
        if shape is None or num_classes is None:
            self._load()
            shape, num_classes = self.pixels.shape[1:], (len(self.classes) if self.labels is not None else 0)
        self.shape, self.num_classes = tuple(shape), int(num_classes)
        self.spec = {"name": name, "path": path, "image_size": image_size, "skip_bad": skip_bad,
                     "shape": list(self.shape), "num_classes": self.num_classes, "classes": self.classes}
        if name not in (*EMBEDDED_IMAGES, "cifar10"):
            self.spec["holdout"] = self.holdout
        self.device = torch.device("cpu")

    def _load(self):
        from .images import EMBEDDED, cached_cifar10, cached_image_folder, open_image_array
        from .loader import Pixels

        test_from = None
        if self.name in EMBEDDED:
            (x, y), (xt, yt) = EMBEDDED[self.name]("train"), EMBEDDED[self.name]("test")
            self.pixels, self.labels = Pixels(torch.cat([x, xt]).numpy()), torch.cat([y, yt]).numpy()
            self.classes, test_from = [str(k) for k in range(10)], len(x)
        elif self.name in ("images", "cifar10"):
            cached = (cached_image_folder(self.path, self.image_size, self.skip_bad) if self.name == "images"
                      else cached_cifar10(self.path))
            self.pixels, self.labels = Pixels(cached.pixels, cached.file), cached.labels
            self.classes, test_from = cached.meta["classes"] or None, cached.meta.get("test_from")
        else:
            self.pixels = Pixels(open_image_array(self.path), self.path)
        n = len(self.pixels)
        self._held_out = test_from is not None or int(n * self.holdout) > 0
        if test_from is not None:
            self.train_rows, self.held_rows = np.arange(test_from), np.arange(test_from, n)
        else:
            train, held = split_rows(n, self.holdout, self.path)
            self.train_rows, self.held_rows = train.numpy(), (held if len(held) else train).numpy()

    def _data(self):
        if self.pixels is None:
            self._load()
            if self.pixels.shape[1:] != self.shape:
                raise UserError(f"{self.path or self.name}: images now have shape {self.pixels.shape[1:]}, "
                                f"the run expects {self.shape}")
        return self.pixels

    def to(self, device):
        self.device = torch.device(device)
        return self

    def _labels(self, rows, device):
        return torch.from_numpy(self.labels[rows]).to(device) if self.labels is not None and self.num_classes else None

    def sample(self, n, generator):
        self._data()
        idx = torch.randint(len(self.train_rows), (n,), generator=generator, device=generator.device)
        rows = self.train_rows[idx.cpu().numpy()]
        return Batch(x1=self.encode(self.pixels.rows(rows).to(generator.device)), label=self._labels(rows, generator.device))

    def draws(self, batch_size: int, seed: int, hflip: bool = False):
        """The training batches as a map-style dataset: item ``k`` is draw ``k`` of stream ``seed``."""
        from .loader import Draws

        self._data()
        return Draws(self.pixels, self.train_rows, self.labels if self.num_classes else None, batch_size, seed, hflip)

    def loader(self, batch_size: int, seed: int, start: int = 0, hflip: bool = False, workers: int | None = None):
        """Training batches ``start, start + 1, ...`` of stream ``seed`` on this dataset's device, loaded
        by ``workers`` DataLoader processes (None: :func:`~flowmatch.data.loader.default_workers`)."""
        from .loader import batches, default_workers

        draws = self.draws(batch_size, seed, hflip)
        if workers is None:
            workers = default_workers(len(self.train_rows), in_memory=self.pixels.file is None)
        for x1, label in batches(draws, start, workers, self.device):
            yield Batch(x1=x1, label=label)

    def reference(self, n, generator):
        """Held-out real images (digits, mnist, cifar10: their test splits; user images: the ``holdout``
        share), drawn with replacement."""
        self._data()
        idx = torch.randint(len(self.held_rows), (n,), generator=generator, device=generator.device)
        return self.pixels.rows(self.held_rows[idx.cpu().numpy()]).to(generator.device)

    @property
    def held_out(self) -> bool:
        self._data()
        return self._held_out

    def distinct_rows(self, split, n, generator):
        """Images in [0, 1]. FID and precision/recall compare sets without repeats: a repeated real
        image shrinks its k-nearest-neighbour ball to nothing."""
        self._data()
        rows = self.train_rows if split == "train" else self.held_rows
        return self.pixels.rows(rows[torch.randperm(len(rows), generator=generator)[:n].numpy()])


class DecodeOnly(Dataset):
    """Samples of known shape and scale but no data to draw (a diffusers teacher's space)."""

    def __init__(self, shape, mean=0.0, std=1.0, name="diffusers"):
        super().__init__()
        self.shape, self.mean, self.std = tuple(shape), torch.tensor(float(mean)), torch.tensor(float(std))
        self.spec = {"name": name, "shape": list(self.shape), "mean": float(mean), "std": float(std)}

    def reference(self, n, generator):
        raise UserError("this run's teacher was a diffusers pipeline: there is no data set to compare samples with")


def eval_dataset(spec: dict) -> Dataset:
    """The dataset a trained run decodes and evaluates with: for a student trained on teacher
    pairs, the teacher's data (the pairs themselves are not needed to sample)."""
    while spec.get("name") == "pairs":  # a distilled 2-RF run: pairs of pairs of the data
        spec = spec.get("base") or {}
    if spec.get("name") == "diffusers":
        return DecodeOnly(spec["shape"], spec.get("mean", 0.0), spec.get("std", 1.0))
    return make_dataset(spec)


def is_image_spec(spec: dict) -> bool:
    return spec.get("name") in (*EMBEDDED_IMAGES, "images", "image-array", "cifar10")


def valid_names() -> list[str]:
    return [*TOY2D, *EMBEDDED_IMAGES]


def spec_from_arg(data: str, n_points: int | None = None, seed: int = 0, image_size: int = 32,
                  skip_bad: bool = False, holdout: float = 0.1, cond_columns: str | None = None) -> dict:
    """Turn ``--data NAME|PATH`` into a dataset spec; unknown names list the valid ones. User
    tables and images hold out a share ``holdout`` of their rows for evaluation; a table's
    ``cond_columns`` ("2,3") are conditions, not data."""
    from .images import is_image_array

    columns = parse_columns(cond_columns)
    if columns and not (os.path.splitext(data)[1].lower() in (".npy", ".csv", ".pt") and not is_image_array(data)):
        raise SettingError("cond_columns", f"only applies to tables (.npy, .csv, .pt files), not {data!r}")

    if skip_bad and not os.path.isdir(data):  # other data is refused whole when damaged: nothing to skip
        raise SettingError("skip_bad", f"skips unreadable files of an image folder; {data!r} is not one")
    if data in TOY2D:
        return {"name": data, "n_points": n_points, "seed": seed}
    if n_points is not None:
        raise SettingError("n_points", f"only applies to the 2-D toy data sets ({', '.join(TOY2D)}), not {data!r}")
    if data in EMBEDDED_IMAGES:
        return {"name": data}
    if data.startswith("cifar10:"):
        from .cifar10 import cifar10_dir

        return {"name": "cifar10", "path": str(cifar10_dir(data.split(":", 1)[1]))}
    if os.path.isdir(data):
        return {"name": "images", "path": os.path.abspath(data), "image_size": image_size, "skip_bad": skip_bad,
                "holdout": holdout}
    if is_image_array(data):
        return {"name": "image-array", "path": os.path.abspath(data), "holdout": holdout}
    if os.path.splitext(data)[1].lower() in ARRAY_SUFFIXES or os.path.exists(data):
        return {"name": "array", "path": os.path.abspath(data), "holdout": holdout} | (
            {"cond_columns": columns} if columns else {})
    raise SettingError("data", f"unknown data set {data!r}; expected one of {', '.join(valid_names())}, "
                               "cifar10:DIR, a .npy/.csv/.pt/.npz file or an image folder")


def make_dataset(spec: dict) -> Dataset:
    """Build a dataset from its spec (as saved in ``config.json``)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name == "array":
        return ArrayDataset(**spec)
    if name in TOY2D:
        return ToyDataset(name, **spec)
    if name in (*EMBEDDED_IMAGES, "images", "image-array", "cifar10"):
        return ImageDataset(name, **spec)
    if name == "pairs":
        from .pairs import PairsDataset

        return PairsDataset(**spec)
    raise SettingError("data", f"unknown data set {name!r}; expected one of {', '.join(valid_names())} or a file")


__all__ = ["is_image_spec",
           "Batch", "Dataset", "ToyDataset", "ArrayDataset", "ImageDataset", "DecodeOnly", "make_dataset", "eval_dataset", "spec_from_arg",
           "valid_names"]
