"""User arrays of shape (N, D): ``.npy``, ``.csv`` (comma-separated, optional header),
``.pt`` (a tensor saved with ``torch.save``, loaded with ``weights_only=True``) and ``.npz``
(its array ``x``, and optionally ``cond``: a condition vector per row, :func:`load_table`).

Real numbers of any precision (integers, booleans, float16, bfloat16, float64) are converted
to float32; complex numbers, strings and objects are refused. Values are checked after the
conversion, so a float64 value beyond float32's range (1e300) is refused, not turned into Inf.

Every problem is reported as a :class:`~flowmatch.errors.UserError` naming the file, and a file
is checked against what its header claims before anything is allocated: an ``.npy`` header's
shape against the bytes that follow it, each ``.npz`` member's against its size in the archive,
a ``.pt`` archive's entries against the file (:func:`~flowmatch.files.check_torch_file`).
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np
import torch

from ..errors import SettingError, UserError, first_sentence
from ..files import check_torch_file

ARRAY_SUFFIXES = (".npy", ".csv", ".pt", ".npz")


def npy_header(f, path, size: int) -> tuple[tuple, np.dtype, int]:
    """The header of the .npy array that starts at ``f``'s position and takes ``size`` bytes (a
    file, or a member of an .npz archive): (shape, dtype, header length), checked against the
    bytes after the header, so that nothing is allocated for an array the file cannot hold."""
    start = f.tell()
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, UnicodeDecodeError, zipfile.BadZipFile,
            zlib.error) as e:
        detail = "the file is empty" if size == 0 else f"its header: {first_sentence(e)}"
        raise UserError(f"{path}: not a readable .npy array ({detail})") from None
    header = f.tell() - start
    if dtype.hasobject:
        raise UserError(f"{path}: expected a numeric .npy array, found Python objects (reading them needs pickle, "
                        "which is refused)")
    need, held = math.prod(shape) * dtype.itemsize, size - header
    if need > held:
        raise UserError(f"{path}: its header claims an array of shape {tuple(shape)} ({dtype}, {need:,} bytes) but "
                        f"only {max(held, 0):,} bytes follow it; expected a complete .npy file")
    return tuple(shape), dtype, header


def check_npy(path) -> tuple[tuple, np.dtype]:
    """An .npy file's shape and dtype, read from its header and checked against its size."""
    try:
        with open(path, "rb") as f:
            shape, dtype, _ = npy_header(f, path, os.fstat(f.fileno()).st_size)
    except OSError as e:
        raise UserError(f"{path}: not readable ({e.strerror or type(e).__name__})") from None
    return shape, dtype


#: the most a deflated member can expand (zlib's limit is about 1032:1)
_DEFLATE_RATIO = 1100


def check_npz(path) -> list[str]:
    """Check an .npz archive's members against the archive before numpy reads any: each entry lies
    within the file, stored or deflated (as ``np.savez`` and ``np.savez_compressed`` write them)
    with a size its compressed bytes can hold, and each ``.npy`` header's array fits its entry.
    Returns the array names."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = []
            for info in z.infolist():
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise UserError(f"{path}: member {info.filename} is compressed with method {info.compress_type}; "
                                    "expected stored or deflated members, as numpy writes them")
                holds = info.compress_size if info.compress_type == zipfile.ZIP_STORED else \
                    info.compress_size * _DEFLATE_RATIO + 1024
                if info.header_offset + info.compress_size > size or info.file_size > holds:
                    raise UserError(f"{path}: member {info.filename} claims {info.file_size:,} bytes that the "
                                    f"{size:,}-byte archive cannot hold; expected a complete .npz file")
                if info.filename.endswith(".npy"):
                    with z.open(info) as member:
                        npy_header(member, f"{path}: member {info.filename}", info.file_size)
                    names.append(info.filename[:-len(".npy")])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as e:
        if isinstance(e, UserError):
            raise
        detail = "the file is empty" if size == 0 else first_sentence(e)
        raise UserError(f"{path}: not a readable .npz file ({detail})") from None
    return names


def _read(path: str, key: str = "x") -> np.ndarray:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        check_npz(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                if key not in npz.files:
                    raise UserError(f"{path}: no array {key!r} in the .npz file (it holds {', '.join(npz.files) or 'none'})")
                return npz[key]
        except ValueError as e:  # object arrays need pickle: refused
            raise UserError(f"{path}: expected numeric arrays in the .npz file ({e})") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise UserError(f"{path}: not a readable .npz file ({first_sentence(e)})") from None
    if suffix == ".npy":
        check_npy(path)
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:  # object arrays need pickle: refused
            raise UserError(f"{path}: expected a numeric .npy array ({e})") from None
        except (OSError, EOFError) as e:
            raise UserError(f"{path}: not a readable .npy file ({e})") from None
    if suffix == ".csv":
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        if not lines:
            raise UserError(f"{path}: the CSV file is empty; expected rows of numbers")
        rows = [ln.split(",") for ln in lines]
        if rows and not _numeric_row(rows[0]):
            rows = rows[1:]  # a header
        if not rows:
            raise UserError(f"{path}: the CSV file has a header but no rows")
        width = len(rows[0])
        for k, row in enumerate(rows):
            if len(row) != width:
                raise UserError(f"{path}: row {k + 1} has {len(row)} columns, expected {width}")
            if not _numeric_row(row):
                raise UserError(f"{path}: row {k + 1} is not numeric: {','.join(row)[:60]!r}")
        return np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    if suffix == ".pt":
        check_torch_file(path, "a tensor saved with torch.save (read with weights_only=True)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
            raise UserError(f"{path}: not a tensor file readable with weights_only=True ({type(e).__name__}: "
                            f"{first_sentence(e)[:120]})") from None
        if not isinstance(obj, torch.Tensor):
            raise UserError(f"{path}: expected a saved tensor, found {type(obj).__name__}")
        if obj.is_complex() or obj.is_quantized or obj.is_sparse:
            raise UserError(f"{path}: expected real numbers, found a tensor of dtype {obj.dtype}")
        # NumPy has no bfloat16: every real dtype goes through float64, which holds them all
        return obj.detach().cpu().to(torch.float64).numpy()
    raise UserError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(ARRAY_SUFFIXES)}")


def _numeric_row(row) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def load_array(path: str, ndim: int = 2, key: str = "x") -> torch.Tensor:
    """Load and validate a float array with ``ndim`` dimensions (``key``: the array of an .npz
    file); returns float32 on the CPU."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    arr = _read(path, key)
    if key == "cond" and arr.ndim == 1:  # one condition per row
        arr = arr[:, None]
    if arr.dtype.kind not in "fiub":
        raise UserError(f"{path}: expected real numbers, found dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise UserError(f"{path}: expected an array of {ndim} dimensions, found shape {arr.shape}")
    if arr.shape[0] < 2 or arr.size == 0:
        raise UserError(f"{path}: expected at least 2 rows of data, found shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = arr.astype(np.float32)  # overflow becomes Inf, caught just below
    check_finite(arr, path)
    return torch.from_numpy(arr)


def check_finite(arr: np.ndarray, path: str) -> None:
    """Refuse NaN, Inf and values beyond float32's range (checked on the float32 array)."""
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int((~finite).any(axis=tuple(range(1, arr.ndim))).nonzero()[0][0])
        raise UserError(f"{path}: row {bad} holds NaN or Inf, or a value beyond float32's range (±3.4e38); "
                        "expected finite numbers")


def parse_columns(text: str | None) -> list[int] | None:
    """``--cond-columns 2,3`` -> [2, 3]: distinct column indices (from 0), or None."""
    if text is None or not str(text).strip():
        return None
    try:
        cols = [int(c) for c in str(text).split(",")]
    except ValueError:
        raise SettingError("cond_columns", f"expected column indices from 0 separated by commas (e.g. 2,3), got {text!r}") from None
    if any(c < 0 for c in cols) or len(set(cols)) != len(cols):
        raise SettingError("cond_columns", f"expected distinct column indices >= 0, got {text!r}")
    return cols


def load_table(path: str, cond_columns: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A table's rows ``x`` and, where it has them, a condition vector per row: the columns
    ``cond_columns`` of a table (split off ``x``), or an .npz file's array ``cond`` ((N,) or
    (N, K), beside its ``x``)."""
    npz = path.lower().endswith(".npz")
    if npz and cond_columns:
        raise SettingError("cond_columns", f"{path} is an .npz file, whose conditions are its array 'cond'; "
                                           "condition columns are for tables")
    rows = load_array(path)
    if npz:
        has_cond = "cond" in check_npz(path)
        if not has_cond:
            return rows, None
        cond = load_array(path, key="cond")
        if len(cond) != len(rows):
            raise UserError(f"{path}: 'cond' has {len(cond)} rows and 'x' has {len(rows)}; expected one condition per row")
        return rows, cond
    if not cond_columns:
        return rows, None
    width = rows.shape[1]
    if max(cond_columns) >= width or len(cond_columns) >= width:
        raise SettingError("cond_columns", f"{path} has {width} columns (0..{width - 1}); expected condition columns "
                                           f"among them that leave at least one data column, got {','.join(map(str, cond_columns))}")
    keep = [c for c in range(width) if c not in cond_columns]
    return rows[:, keep].contiguous(), rows[:, cond_columns].contiguous()
