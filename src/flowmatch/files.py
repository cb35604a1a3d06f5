"""Files written whole or not at all: a temporary file in the same folder, then ``os.replace``.
Text and JSON, safetensors weights, and the trainer state (read back with
``torch.load(weights_only=True)``); a missing or unreadable file is a :class:`UserError`
naming it. ``metrics.jsonl`` is read here too (appended, so its torn last line is skipped)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import SettingError, UserError, first_sentence


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike):
    """Hold an exclusive lock on the file ``path`` (created if missing), waiting while another
    process holds it: two commands that build the same cache entry build it once, one after the other."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_weights(path, state_dict: dict, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(path, device="cpu") -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; expected safetensors weights")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:80]})") from None


def load_script(path, option: str, expected: str, map_location="cpu") -> torch.jit.ScriptModule:
    """A TorchScript module the user names with ``option`` (``torch.jit.load``: TorchScript code
    and tensors, no Python pickle), in eval mode. ``expected`` says what the file should hold,
    for the missing-file error."""
    path = Path(path)
    if not path.is_file():
        raise SettingError(option, f"{path}: no such file; expected {expected}")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is how such networks travel
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=map_location).eval()
    except Exception as e:  # noqa: BLE001 - any failure to read it is the user's file
        raise SettingError(option, f"{path}: expected a TorchScript file (torch.jit.save), could not load it: "
                        f"{first_sentence(e)}") from None


def save_state(path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path) -> dict:
    """Trainer state through ``torch.load(weights_only=True)``: a pickle payload is refused."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; expected a trainer state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file is one user error
        raise UserError(f"{path}: not a valid trainer state ({type(e).__name__}); refusing to load it") from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{path}: not a valid trainer state (expected a dict with a step)")
    return state


def read_metrics(path, value: str | None = "loss") -> list[dict]:
    """The rows of ``RUN/metrics.jsonl`` (or of ``RUN/eval.jsonl``, with ``value=None``: rows need
    only their step). The file is appended to, so a process killed during an append leaves a torn
    last line: that line is skipped. A bad line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not readable ({type(e).__name__})") from None
    rows = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        row = _metrics_row(line, value)
        if row is None:
            if k == len(lines) - 1:
                break  # torn by an interrupted append
            also = f" and a numeric {value}" if value else ""
            raise UserError(f"{path}: line {k + 1} is not a JSON object with an integer step{also}")
        rows.append(row)
    return rows


def _metrics_row(line: str, value: str | None = "loss") -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = (isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row.get("step"), bool)
          and (value is None or (isinstance(row.get(value), (int, float)) and not isinstance(row.get(value), bool))))
    return row if ok else None
