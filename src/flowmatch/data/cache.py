"""The image cache: an image source decoded once into a uint8 array file (N, C, H, W), memory-mapped.

Decoding a folder of PNGs takes minutes and, held as float32, four bytes per pixel of memory. The
cache takes one byte per pixel *on disk*; training reads rows of it through ``np.load(mmap_mode="r")``,
so the pages are the kernel's file cache (shared, reclaimable), not the process's own memory.

Where: ``$FLOWMATCH_CACHE/images`` (default ``~/.cache/flowmatch/images``; ``$FLOWMATCH_IMAGE_CACHE``
names the folder itself); delete the folder to clear it. An entry is keyed on the source's absolute
path, its decode settings (image size, skipping bad files) and a fingerprint of its file list
(relative name, size and modification time of each file), so adding, removing or changing a file
decodes afresh (and the older entries of that source are removed). Each entry is ``NAME.npy``
(pixels), ``NAME.labels.npy`` (class indices, labelled sources) and ``NAME.json`` (shape,
classes...), each written to a temporary file and renamed into place, the JSON last: a decode
killed half-way leaves no entry that could be read.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: bump when the decoding changes what a cache entry holds
VERSION = 1


def cache_root() -> Path:
    """``$FLOWMATCH_IMAGE_CACHE``, else ``$FLOWMATCH_CACHE/images``, else ``~/.cache/flowmatch/images``."""
    if os.environ.get("FLOWMATCH_IMAGE_CACHE"):
        return Path(os.environ["FLOWMATCH_IMAGE_CACHE"])
    return Path(os.environ.get("FLOWMATCH_CACHE", Path.home() / ".cache" / "flowmatch")) / "images"


@dataclass
class CachedImages:
    """A cache entry: pixels (N, C, H, W) uint8 memory-mapped read-only; labels (N,) or None; ``meta``
    (what the decoder recorded: classes, the first held-out row...)."""

    pixels: np.ndarray
    labels: np.ndarray | None
    meta: dict
    file: Path


def source_key(source: dict, files: list[Path], root: Path) -> str:
    """A hash of the source's description and its files' names, sizes and modification times."""
    listing = []
    for f in files:
        st = f.stat()
        listing.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
    doc = json.dumps({"version": VERSION, "source": source, "files": listing}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:24]


def cached_images(source: dict, files: list[Path], root: Path, shape: tuple, fill, meta: dict) -> CachedImages:
    """The entry for ``source`` (a JSON-able dict with its ``kind`` and absolute ``path``), decoded
    by ``fill(pixels, labels) -> rows written`` into arrays of ``shape`` (rows beyond those written:
    skipped files, trimmed) unless the cache holds it already; ``shape`` may be a function, called
    only then. ``meta`` is stored beside it."""
    key = source_key(source, files, root)
    base = cache_root() / f"{source['kind']}-{Path(source['path']).name}-{key}"
    entry = _open(base, key)
    if entry is not None:
        return entry
    from ..files import waiting_lock

    with waiting_lock(_file(base, ".lock")):  # another process decoding the same source: wait, then read its entry
        entry = _open(base, key)
        if entry is None:
            _write(base, key, source, shape() if callable(shape) else shape, fill, meta)
            entry = _open(base, key)
    _remove_older(base, source)
    return entry


def _file(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)  # not with_suffix: a folder's name may hold a dot


def _open(base: Path, key: str) -> CachedImages | None:
    from .arrays import check_npy

    try:
        meta = json.loads(_file(base, ".json").read_text())
        pixels = np.load(_file(base, ".npy"), mmap_mode="r")
        labels = None
        if meta["labelled"]:
            check_npy(_file(base, ".labels.npy"))  # its header against its size (a UserError is a ValueError)
            labels = np.load(_file(base, ".labels.npy"), allow_pickle=False)
        if meta["key"] != key or list(pixels.shape) != meta["shape"] or pixels.dtype != np.uint8:
            return None
        return CachedImages(pixels, labels, meta, _file(base, ".npy"))
    except (OSError, ValueError, KeyError):  # absent or damaged: decoded afresh
        return None


def _write(base: Path, key: str, source: dict, shape: tuple, fill, meta: dict) -> None:
    from ..files import atomic_file, write_fault, write_text

    tmp = base.with_name(f".{base.name}.{os.getpid()}.tmp.npy")
    trim = Path(f"{tmp}.trim")
    try:
        pixels = _allocated(tmp, tuple(shape))
        labels = np.full(shape[0], -1, dtype=np.int64)
        n = fill(pixels, labels)
        pixels.flush()
        if n < shape[0]:  # skipped files: a copy of the rows written, in chunks (the pixels stay on disk)
            trimmed = _allocated(trim, (n, *shape[1:]))
            for i in range(0, n, 4096):
                trimmed[i:i + 4096] = pixels[i:min(i + 4096, n)]
            trimmed.flush()
            del pixels, trimmed
            os.replace(trim, tmp)
        else:
            del pixels
        os.replace(tmp, _file(base, ".npy"))
        labelled = bool((labels[:n] >= 0).all())
        if labelled:
            with atomic_file(_file(base, ".labels.npy")) as f:
                np.save(f, labels[:n])
        doc = {**meta, "key": key, "source": source, "shape": [n, *shape[1:]], "labelled": labelled}
        write_text(_file(base, ".json"), json.dumps(doc, indent=1))  # last: the entry is complete
    except OSError as e:
        raise write_fault(_file(base, ".npy"), e) from None
    finally:
        for leftover in (tmp, trim):
            leftover.unlink(missing_ok=True)


def _allocated(path: Path, shape: tuple) -> np.memmap:
    """A uint8 .npy file of ``shape``, its blocks reserved on disk before it is mapped: a disk too
    small for it is an ``OSError`` here, not a SIGBUS when a mapped page is first written."""
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):  # a file system without it: written as it comes
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)
    return pixels


def _remove_older(base: Path, source: dict) -> None:
    """Other entries of the same source (it changed since): they would never be read again."""
    for other in base.parent.glob(glob.escape(f"{source['kind']}-{Path(source['path']).name}-") + "*.json"):
        other = other.with_name(other.name[:-len(".json")])
        if other.name == base.name:
            continue
        with contextlib.suppress(OSError, ValueError):
            if json.loads(_file(other, ".json").read_text()).get("source") == source:
                for suffix in (".json", ".npy", ".labels.npy", ".lock"):
                    _file(other, suffix).unlink(missing_ok=True)
