"""Fixed teacher pairs ``(z0, z1)`` as training data (reflow and distillation): the shards
``PAIRS/shard-KKKKK.safetensors`` and ``PAIRS/pairs.json`` that :func:`flowmatch.reflow.generate_pairs`
writes, read back in the teacher's model space."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..files import load_weights
from ..seeding import generator
from . import Batch, Dataset, make_dataset


def read_pairs_meta(meta_file) -> dict:
    """``PAIRS/pairs.json``, checked: the counts and the shape it claims are positive integers that
    agree (``num_shards`` shards of ``shard_size`` pairs hold ``n``), so that nothing is sized from
    a number the folder cannot hold."""
    meta_file = Path(meta_file)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_file}: not readable as JSON ({type(e).__name__}); expected the pairs' metadata that "
                        "reflow and distill write") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_file}: expected a JSON object (the pairs' metadata)")

    def count(key, minimum=1):
        value = meta.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise UserError(f"{meta_file}: '{key}' should be an integer >= {minimum}, got {value!r}")
        return value

    n, size, shards = count("n"), count("shard_size"), count("num_shards")
    count("seed", minimum=-(2**63))
    if shards != -(-n // size):
        raise UserError(f"{meta_file}: {shards} shards of {size} pairs do not hold {n} pairs; expected {-(-n // size)}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) in (1, 3)
            and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in shape)):
        raise UserError(f"{meta_file}: 'shape' should be a list of 1 or 3 positive integers, got {shape!r}")
    return meta


def check_pairs(pairs_dir) -> dict:
    """Read and check a pairs folder's metadata: complete, and the shapes it claims."""
    pairs_dir = Path(pairs_dir)
    meta_file = pairs_dir / "pairs.json"
    if not meta_file.is_file():
        raise UserError(f"{pairs_dir}: no pairs.json; not a folder of teacher pairs")
    meta = read_pairs_meta(meta_file)
    # counted from the folder's files, never by going through the number of shards pairs.json claims
    have = set()
    for f in pairs_dir.glob("shard-*.safetensors"):
        stem = f.name[len("shard-"):-len(".safetensors")]
        if stem.isdigit() and f"{int(stem):05d}" == stem and int(stem) < meta["num_shards"]:
            have.add(int(stem))
    missing = meta["num_shards"] - len(have)
    if missing:
        raise UserError(f"{pairs_dir}: {missing} of {meta['num_shards']} shards missing; finish them by resuming (`resume`)")
    return meta


def shard_shapes(path) -> dict:
    """The tensors a shard holds and their shapes, from its safetensors header (checked against the
    file's size by safetensors), without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise UserError(f"{path}: no such file; expected a shard of teacher pairs")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:80]})") from None


class PairsDataset(Dataset):
    """Fixed teacher pairs ``(z0, z1)`` from shards, in the teacher's model space.

    Shards are held in memory while they fit in ``max_bytes``; beyond that a window of
    shards is resident and moves on through a seeded shuffle of the shards as batches are
    served (its position is part of the trainer state, so a resumed run continues exactly).
    """

    def __init__(self, dir: str, base: dict | None = None, max_bytes: int = 2**30):
        super().__init__()
        self.dir = Path(dir)
        meta = check_pairs(self.dir)
        self.meta, self.shape = meta, tuple(meta["shape"])
        self.base = make_dataset(base) if base and base.get("name") not in ("diffusers", None) else None
        if self.base is not None:
            self.mean, self.std = self.base.mean, self.base.std
        elif base:
            self.mean = torch.tensor(float(base.get("mean", 0.0)))
            self.std = torch.tensor(float(base.get("std", 1.0)))
        # Pairs made with --guidance carry the class each was drawn for, and the student learns the
        # classes; otherwise the teacher sampled its null class, and the student keeps the teacher's
        # label embedding (so it starts as the teacher's field) and learns the null class only.
        self.num_classes = int(meta.get("num_classes", 0))
        self.labelled = meta.get("guidance") is not None
        self.cond_dim = int(meta.get("cond_dim", 0))
        self.spec = {"name": "pairs", "dir": str(self.dir.resolve()), "base": base}
        per_shard = 2 * 4 * meta["shard_size"] * max(1, int(torch.tensor(self.shape).prod()))
        self.window = max(1, min(meta["num_shards"], max_bytes // per_shard))
        self.served, self.device, self._resident = 0, torch.device("cpu"), None

    def _load(self, k):
        path = self.dir / f"shard-{k:05d}.safetensors"
        m = min(self.meta["shard_size"], self.meta["n"] - k * self.meta["shard_size"])
        expected = {"z0": (m, *self.shape), "z1": (m, *self.shape), **({"label": (m,)} if self.labelled else {})}
        shapes = shard_shapes(path)  # the header only: a shard is loaded once it is known to hold its pairs
        for name, shape in expected.items():
            if shapes.get(name) != shape:
                found = "none" if name not in shapes else f"shape {shapes[name]}"
                raise UserError(f"{path}: expected '{name}' of shape {shape} ({m} pairs, as pairs.json says), found {found}")
        t = load_weights(path)
        return t["z0"], t["z1"], t.get("label") if self.labelled else None

    def _window_shards(self, w: int) -> list[int]:
        n = self.meta["num_shards"]
        per_epoch = -(-n // self.window)
        epoch, pos = divmod(w, per_epoch)
        order = torch.randperm(n, generator=generator(self.meta["seed"], "pairs-order", epoch)).tolist()
        return order[pos * self.window:(pos + 1) * self.window]

    def _ensure(self, batch: int):
        if self.window >= self.meta["num_shards"]:
            w = 0
        else:
            w = self.served * batch // (self.window * self.meta["shard_size"])
        if self._resident is None or self._resident[0] != w:
            parts = [self._load(k) for k in self._window_shards(w)]
            z0 = torch.cat([p[0] for p in parts]).to(self.device)
            z1 = torch.cat([p[1] for p in parts]).to(self.device)
            label = torch.cat([p[2] for p in parts]).to(self.device) if self.labelled else None
            self._resident = (w, z0, z1, label)
        return self._resident[1:]

    def to(self, device):
        self.device = torch.device(device)
        self._resident = None
        return self

    def sample(self, n, generator):
        z0, z1, label = self._ensure(n)
        self.served += 1
        idx = torch.randint(len(z0), (n,), generator=generator, device=generator.device).to(z1.device)
        return Batch(x1=z1[idx], x0=z0[idx], label=label[idx] if label is not None else None)

    def reference(self, n, generator):
        if self.base is None:
            raise UserError(f"{self.dir}: the teacher's data set is unknown, so there is no fresh data to compare with")
        return self.base.reference(n, generator)

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = int(state["served"])
        self._resident = None
