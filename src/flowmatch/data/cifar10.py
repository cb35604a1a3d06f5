"""CIFAR-10 in its official *binary* distribution (``cifar-10-batches-bin/``), never the pickled one
(unpickling a downloaded file runs whatever code it holds).

Each ``.bin`` file is a run of 3073-byte records: one label byte (0..9), then the 32x32 image as
1024 red, 1024 green and 1024 blue bytes, each plane row by row. So a file *is* a uint8 array
(n, 3073) whose columns 1: reshape to (n, 3, 32, 32) with no conversion. ``data_batch_1.bin`` ..
``data_batch_5.bin`` train (50,000 images), ``test_batch.bin`` is held out (10,000), and
``batches.meta.txt`` names the classes, one per line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SettingError, UserError

RECORD = 1 + 3 * 32 * 32
TRAIN_FILES = tuple(f"data_batch_{k}.bin" for k in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"


def cifar10_dir(path: str) -> Path:
    """The folder holding the .bin files: ``path`` itself, or its ``cifar-10-batches-bin`` subfolder
    (where the official archive unpacks)."""
    root = Path(path).expanduser().absolute()
    if (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    pickled = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if (pickled / "data_batch_1").is_file() and not (root / TRAIN_FILES[0]).is_file():
        raise SettingError("data", f"cifar10:{path}: {pickled} holds CIFAR-10's Python version, pickled batches, "
                                   "which flowmatch never unpickles (unpickling a file runs the code it holds); "
                                   "download the binary version (cifar-10-binary.tar.gz, cifar-10-batches-bin/)")
    if not root.is_dir():
        raise SettingError("data", f"cifar10:{path}: {root} is not a folder; expected the CIFAR-10 binary "
                        f"distribution (cifar-10-batches-bin/ with {TRAIN_FILES[0]} .. {TEST_FILE})")
    return root


def cifar10_files(root: Path) -> tuple[list[Path], list[str]]:
    """The six .bin files (training first, the test batch last), checked for presence and size,
    and the ten class names."""
    files = [root / name for name in (*TRAIN_FILES, TEST_FILE)]
    for f in [*files, root / META_FILE]:
        if not f.is_file():
            raise UserError(f"{f}: missing; expected the CIFAR-10 binary distribution ({', '.join(TRAIN_FILES)}, "
                            f"{TEST_FILE}, {META_FILE})")
    for f in files:
        size = f.stat().st_size
        if size == 0 or size % RECORD:
            raise UserError(f"{f}: {size} bytes is not a whole number of {RECORD}-byte records (1 label byte + 3072 "
                            "pixel bytes); expected an untruncated CIFAR-10 binary batch")
    classes = [ln.strip() for ln in (root / META_FILE).read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if len(classes) != 10:
        raise UserError(f"{root / META_FILE}: expected 10 class names, one per line, found {len(classes)}")
    return files, classes


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One .bin file as (images (n, 3, 32, 32) uint8, labels (n,) int64): a memory-mapped view,
    nothing is decoded. Labels beyond 0..9 are refused, naming the record."""
    rows = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, RECORD)
    labels = rows[:, 0].astype(np.int64)
    if labels.max(initial=0) > 9:
        bad = int(np.argmax(labels > 9))
        raise UserError(f"{path}: record {bad} has label {labels[bad]}; expected 0..9 (is this CIFAR-100?)")
    return rows[:, 1:].reshape(-1, 3, 32, 32), labels
