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


def check_pairs(pairs_dir) -> dict:
    """Read and check a pairs folder's metadata: complete, and the shapes it claims."""
    pairs_dir = Path(pairs_dir)
    meta_file = pairs_dir / "pairs.json"
    if not meta_file.is_file():
        raise UserError(f"{pairs_dir}: no pairs.json; not a folder of teacher pairs")
    meta = json.loads(meta_file.read_text())
    missing = [k for k in range(meta["num_shards"]) if not (pairs_dir / f"shard-{k:05d}.safetensors").is_file()]
    if missing:
        raise UserError(f"{pairs_dir}: {len(missing)} of {meta['num_shards']} shards missing; finish them by resuming (`resume`)")
    return meta


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
        t = load_weights(self.dir / f"shard-{k:05d}.safetensors")
        if tuple(t["z0"].shape[1:]) != self.shape or t["z0"].shape != t["z1"].shape:
            raise UserError(f"{self.dir}/shard-{k:05d}.safetensors: pairs of shape {tuple(t['z0'].shape)}, expected {self.shape}")
        if self.labelled and ("label" not in t or t["label"].shape != (len(t["z0"]),)):
            raise UserError(f"{self.dir}/shard-{k:05d}.safetensors: pairs with classes need one label per pair")
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
