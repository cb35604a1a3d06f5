"""Hub-style folders: a trained run as the folder a model hub holds, and back.

The layout is huggingface_hub's convention for PyTorch models (``PyTorchModelHubMixin``)::

    DIR/config.json        the run's config.json (every setting that rebuilds the network, path and data),
                           with "pretrained": which weights were saved
    DIR/model.safetensors  the weights that sample (the EMA copy by default)
    DIR/README.md          a model card (huggingface_hub.ModelCard): what was trained, how long, its measures

``flowmatch.load`` (:func:`flowmatch.runs.load`) reads such a folder, a run directory, or a Hub
repository id (:func:`download`, with ``huggingface_hub.snapshot_download``; nothing else is
fetched), and returns a :class:`~flowmatch.runs.Run`: ``flowmatch.load(DIR).sample(16)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import SettingError, UserError
from .files import read_metrics, save_weights, waiting_lock, write_json, write_text

#: the files a Hub folder holds (and the only ones downloaded)
FILES = ("config.json", "model.safetensors", "README.md")


def _measures(run) -> dict:
    """What the run itself recorded: the last logged loss, wall-clock, and any eval JSON left in it."""
    out = {}
    metrics = run.dir / "metrics.jsonl"
    if metrics.exists():
        rows = read_metrics(metrics)
        if rows:
            last = rows[-1]
            out["training"] = {("seconds" if k == "time" else k): last[k] for k in ("step", "loss", "time") if k in last}
    evals = run.dir / "eval.jsonl"  # the measures of training's periodic evaluation: its last row
    rows = read_metrics(evals, value=None)
    if rows:
        out[f"evaluation at step {rows[-1].get('step', '?')}"] = {k: v for k, v in rows[-1].items() if k != "step"}
    return out


def _card(run, measures: dict, weights: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    cfg, data = run.cfg, run.doc["data"].get("name", "?")
    rows = []
    for name, value in measures.items():
        if isinstance(value, dict):
            flat = {k: v for k, v in value.items() if isinstance(v, (int, float))}
            for k, v in flat.items():
                rows.append(f"| {name} | {k} | {v:.6g} |")
            for space in ("classifier", "pca"):
                if isinstance(value.get(space), dict) and "ratio" in value[space]:
                    rows.append(f"| {name} | Fréchet distance / floor ({space}) | {value[space]['ratio']:.4g} |")
    table = "\n".join(["| source | measure | value |", "|---|---|---|", *rows]) if rows else "No measures were recorded."
    text = f"""---
{ModelCardData(library_name="flowmatch", tags=["flow-matching", "generative", cfg.objective]).to_yaml()}
---

# flowmatch model: {data}

A flow-matching velocity field trained with flowmatch (`flowmatch train`): objective
`{cfg.objective}`, path `{cfg.path}`, coupling `{cfg.coupling}`, {cfg.steps} steps at batch {cfg.batch_size},
samples of shape {tuple(run.shape)}{f", {run.num_classes} classes" if run.num_classes else ""}.
Lineage: {json.dumps(cfg.lineage) if cfg.lineage else "trained from scratch"}. Weights: the run's `{weights}` copy.

```python
import flowmatch

run = flowmatch.load("THIS_FOLDER_OR_REPO_ID")
x = run.sample(16, nfe={run.default_nfe})   # in the data's own units
```

or `flowmatch sample THIS_FOLDER --n 16 --out samples.npy`.

## Measures

{table}
"""
    return str(ModelCard(text))


def save_pretrained(run, folder, weights: str | None = None, overwrite: bool = False) -> Path:
    """Write a loaded :class:`~flowmatch.runs.Run` as a Hub folder; returns the folder. An
    existing folder is replaced only with ``overwrite``. (``flowmatch.save_pretrained`` also takes
    a run directory.)"""
    weights = weights or run.weights
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise SettingError("out", f"{folder} already exists; pass `overwrite` to replace it")
    if not folder.parent.is_dir():
        raise SettingError("out", f"folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    doc = {**run.doc, "pretrained": {"weights": "model.safetensors", "from": weights, "run": str(run.dir.resolve())}}
    # two writers of one folder write one after the other (a lock file beside it): never a mix of two runs' files
    with waiting_lock(folder.parent / f".{folder.name}.lock"):
        save_weights(folder / "model.safetensors", run.model.state_dict(), {"format": "flowmatch", "weights": weights})
        write_json(folder / "config.json", doc)
        write_text(folder / "README.md", _card(run, _measures(run), weights))
    return folder


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def download(name: str, revision: str | None = None) -> Path:
    """A Hub repository id ("owner/name") fetched into huggingface_hub's cache (only :data:`FILES`)."""
    if not _REPO_ID.match(str(name)):
        raise UserError(f"{name}: neither a folder nor a Hub repository id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), revision=revision, allow_patterns=list(FILES)))
    except Exception as e:  # noqa: BLE001 - network, missing repository, offline mode: one line
        raise UserError(f"{name}: could not download from the Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
