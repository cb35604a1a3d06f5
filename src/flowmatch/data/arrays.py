"""User arrays of shape (N, D): ``.npy``, ``.csv`` (comma-separated, optional header),
``.pt`` (a tensor saved with ``torch.save``, loaded with ``weights_only=True``) and ``.npz``
(its array ``x``, and optionally ``cond``: a condition vector per row, :func:`load_table`).

Real numbers of any precision (integers, booleans, float16, bfloat16, float64) are converted
to float32; complex numbers, strings and objects are refused. Values are checked after the
conversion, so a float64 value beyond float32's range (1e300) is refused, not turned into Inf.

Every problem is reported as a :class:`~flowmatch.errors.UserError` naming the file.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import SettingError, UserError

ARRAY_SUFFIXES = (".npy", ".csv", ".pt", ".npz")


def _read(path: str, key: str = "x") -> np.ndarray:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                if key not in npz.files:
                    raise UserError(f"{path}: no array {key!r} in the .npz file (it holds {', '.join(npz.files) or 'none'})")
                return npz[key]
        except ValueError as e:  # object arrays need pickle: refused
            raise UserError(f"{path}: expected numeric arrays in the .npz file ({e})") from None
        except (OSError, EOFError) as e:
            raise UserError(f"{path}: not a readable .npz file ({e})") from None
    if suffix == ".npy":
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise UserError(f"{path}: not a readable .npy file (no NumPy header)")
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
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
            raise UserError(f"{path}: not a tensor file readable with weights_only=True ({type(e).__name__})") from None
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
        with np.load(path, allow_pickle=False) as f:
            has_cond = "cond" in f.files
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
