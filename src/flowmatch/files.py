"""Files written whole or not at all: a temporary file in the same folder, then ``os.replace``.
Text and JSON, safetensors weights, and the trainer state (read back with
``torch.load(weights_only=True)``); a missing or unreadable file is a :class:`UserError`
naming it. ``metrics.jsonl`` is read here too (appended, so its torn last line is skipped).

Every write goes through here, and a write that fails (a full disk, a quota, a read-only or
failing file system) is an :class:`~flowmatch.errors.EnvironmentFault` naming the file and the
reason, with the temporary file removed and the file it would have replaced left as it was; an
appended line that does not fit is taken back whole (:func:`append_line`)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import EnvironmentFault, SettingError, UserError, first_sentence


def write_fault(path, e: BaseException) -> EnvironmentFault:
    """The one-line error for a write of ``path`` that failed with ``e`` (an ``OSError``, or the
    error a library made of one)."""
    code = getattr(e, "errno", None)
    if code is None:  # safetensors and torch wrap the OSError in their own messages
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else (getattr(e, "strerror", None) or first_sentence(e))
    return EnvironmentFault(f"{path}: could not write it ({reason})")


class _Writer(io.RawIOBase):
    """A binary file object over a descriptor whose failed writes are remembered: libraries that
    write through it (``torch.save``, ``np.save``) replace the ``OSError`` with their own message,
    and the remembered one says what happened (the lowest layer every atomic write goes through)."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd, self.error = fd, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as e:
            self.error = e
            raise
        return done


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically. With
    ``overwrite=False`` an existing ``path`` is never replaced, even one another process wrote
    meanwhile: a :class:`UserError`. A failed write (:func:`write_fault`) leaves no temporary
    file and ``path`` as it was."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp.", suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise write_fault(path, e) from None
    try:
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        try:
            yield tmp
        except (SafetensorError, RuntimeError) as e:
            if "os error" in str(e) or isinstance(getattr(e, "__cause__", None), OSError):
                raise write_fault(path, e) from None
            raise
        except EnvironmentFault as e:  # a writer that went through its own temporary file: name ours
            if str(e).startswith(f"{tmp}:"):
                raise EnvironmentFault(str(path) + str(e)[len(tmp):]) from None
            raise
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _put(tmp, path, overwrite)
    except OSError as e:
        raise write_fault(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _put(tmp: str, path: Path, overwrite: bool) -> None:
    """``tmp`` becomes ``path``: replacing it, or (``overwrite=False``) only where there is none."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails where path exists
    except FileExistsError:
        raise UserError(f"{path}: already exists (another process wrote it meanwhile); pass `overwrite` to "
                        "replace it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if path.exists():  # a file system without hard links: checked, then replaced
            raise UserError(f"{path}: already exists (another process wrote it meanwhile); pass `overwrite` to "
                            "replace it") from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True):
    """:func:`atomic_path` as a binary file object open for writing (what ``torch.save`` and
    ``np.save`` write to): a write that fails is reported as the ``OSError`` it was, whatever the
    library made of it."""
    with atomic_path(path, overwrite) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        writer = _Writer(fd)
        try:
            yield writer
        except (OSError, RuntimeError, ValueError):  # what torch.save, np.save and safetensors make of a failed write
            if writer.error is not None:
                raise write_fault(path, writer.error) from None
            raise
        finally:
            os.close(fd)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (``line`` ends with a newline) to ``path``, created if missing. A line that
    does not fit is taken back, so the file never ends in a torn line this process wrote."""
    data = line.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_fault(path, e) from None
    try:
        size = os.fstat(fd).st_size
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise write_fault(path, e) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike):
    """Hold an exclusive lock on the file ``path`` (created if missing), waiting while another
    process holds it: two commands that build the same cache entry build it once, one after the other."""
    import fcntl

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_fault(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_text(path, text: str, overwrite: bool = True) -> None:
    with atomic_file(path, overwrite) as f:
        f.write(text.encode("utf-8"))


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


def check_torch_file(path, what: str) -> None:
    """A ``torch.save`` file checked against its size before ``torch.load`` allocates anything: a
    zip archive (torch.save's format since PyTorch 1.6) whose entries are stored, uncompressed,
    within the file (torch then checks each tensor's bytes against its entry). The older format
    allocates what its pickle claims before reading, so it is refused. ``what``: what the file
    should hold, for the message."""
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        detail = "the file is empty" if os.path.isfile(path) and os.path.getsize(path) == 0 else first_sentence(e)
        raise UserError(f"{path}: not a torch.save archive ({detail}); expected {what} (a file written by "
                        "torch.save in PyTorch 1.6 or later)") from None
    for info in infos:
        if (info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size
                or info.header_offset + info.compress_size > size):
            raise UserError(f"{path}: entry {info.filename} claims {info.file_size:,} bytes that the {size:,}-byte "
                            f"file does not hold as torch.save writes them; expected {what}")


def save_state(path, state: dict) -> None:
    with atomic_file(path) as f:
        torch.save(state, f)


def load_state(path) -> dict:
    """Trainer state through ``torch.load(weights_only=True)``: a pickle payload is refused."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; expected a trainer state to resume from")
    check_torch_file(path, "a trainer state (trainer_state.pt)")
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
