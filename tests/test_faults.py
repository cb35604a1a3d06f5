"""Reliability under faults (issue 56): each class of fault produced for real.

1. Files that lie about their size (an .npy header claiming 10^12 rows in 100 bytes): every reader
   checks what the file can hold before allocating, and names the file (hypothesis-generated).
2. Empty and truncated files: bad input (status 2, one line), never an interrupt (130).
3. ``--skip-bad``: unreadable image files among good ones are skipped in every step of the reader.
4. A full disk (a real tmpfs of a few hundred KiB, filled: mounting needs root, so these are
   skipped without it; the injected-fault test covers the writers everywhere): one line naming
   the path, status 1, no temporary file, the last checkpoint intact, and ``--resume`` continues
   exactly once there is room.
5. SIGTERM (a real signal): train checkpoints the current step and exits 143 with a line saying how
   to resume, which then continues bit-exactly; reflow finishes its shard; sample writes nothing.
6. Two processes on one run, one output file or one cache entry: one waits or is refused.
7. Files from others never run code when read.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import load_file

from helpers import TRAIN_TINY, copy_run, image_folder, one_line_error, write_cifar10

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def _only_line(rc, err, status: int, start: str) -> str:
    """Exit ``status`` and exactly one line on stderr, starting with ``start``, no traceback; returns the line."""
    assert rc == status, err
    assert "Traceback" not in err, err
    lines = _lines(err)
    assert len(lines) == 1 and lines[0].startswith(start), err
    return lines[0]


def fault_line(rc, err) -> str:
    """A fault of the environment: status 1 and one line."""
    return _only_line(rc, err, 1, "flowmatch: error:")


def stop_line(rc, err) -> str:
    """A stop asked for by SIGTERM: status 143 and one line."""
    return _only_line(rc, err, 143, "flowmatch: stopped by SIGTERM")


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).rglob("*") if ".tmp" in p.name]


def _same_run(ref: Path, other: Path) -> None:
    """Bit-identical weights and the same log (steps and losses), as tests/test_resume.py checks."""
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ref / name), load_file(other / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    rows = [[json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, other)]
    assert [(r["step"], r["loss"]) for r in rows[0]] == [(r["step"], r["loss"]) for r in rows[1]]
    assert not _temporaries(other)


@contextlib.contextmanager
def one_thread():
    """Runs compared bit for bit use one thread, as the subprocesses they are compared with do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- 1. files that lie about their size -------------------------------------------------------

def _npy_bytes(shape, dtype: str, payload: int, version=(1, 0)) -> bytes:
    """An .npy header claiming ``shape`` of ``dtype``, followed by ``payload`` bytes."""
    f = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)}
    (np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0)(f, header)
    return f.getvalue() + b"\0" * payload


def _torch_bytes(t: torch.Tensor) -> bytes:
    f = io.BytesIO()
    torch.save(t, f)
    return f.getvalue()


def _grow_zip_entry(data: bytes, suffix: str, claimed: int) -> bytes:
    """A zip archive whose central directory claims ``claimed`` bytes for the entry ending in
    ``suffix`` (both its compressed and uncompressed size: the archive lies about what it holds)."""
    data = bytearray(data)
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        name = bytes(data[at + 46:at + 46 + name_len]).decode()
        if name.endswith(suffix):
            struct.pack_into("<II", data, at + 20, claimed, claimed)
            return bytes(data)
        at += 4
    raise AssertionError(f"no entry {suffix}")


@st.composite
def lying_files(draw):
    """(file name, bytes) of a data file whose header or archive claims more than the file holds."""
    rows = draw(st.sampled_from([10**12, 2**40, 10**7, 1000]))
    cols = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(["<f8", "<f4", "<i8", "|u1", "<f2"]))
    need = rows * cols * np.dtype(dtype).itemsize
    payload = draw(st.integers(0, min(need - 1, 200)))
    kind = draw(st.sampled_from(["npy", "npy-v2", "npz", "npz-deflated", "npz-entry", "pt-entry", "pt-cut"]))
    if kind.startswith("npy"):
        return "data.npy", _npy_bytes((rows, cols), dtype, payload, (2, 0) if kind == "npy-v2" else (1, 0))
    if kind.startswith("npz"):
        member = _npy_bytes((rows, cols), dtype, payload)
        f = io.BytesIO()
        method = zipfile.ZIP_DEFLATED if kind == "npz-deflated" else zipfile.ZIP_STORED
        if kind == "npz-entry":  # a true member, the archive's directory claiming more than it holds
            member = _npy_bytes((4, cols), dtype, 4 * cols * np.dtype(dtype).itemsize)
        with zipfile.ZipFile(f, "w", compression=method) as z:
            z.writestr("x.npy", member)
        data = f.getvalue()
        return "data.npz", (_grow_zip_entry(data, "x.npy", min(need, 2**32 - 2)) if kind == "npz-entry" else data)
    data = _torch_bytes(torch.ones(4, cols))
    if kind == "pt-entry":
        return "data.pt", _grow_zip_entry(data, "data/0", min(need, 2**32 - 2))
    return "data.pt", data[:draw(st.integers(0, len(data) - 1))]  # cut short: entries beyond its end


@given(case=lying_files())
@example(case=("data.npy", _npy_bytes((10**12, 1), "<f8", 40)))  # the report: 7 TiB from 168 bytes
@example(case=("data.npz", _npy_bytes((10**12, 1), "<f8", 40)))  # not even an archive
def test_files_that_lie_about_their_size_are_refused_naming_them(cli, scratch, case):
    name, data = case
    d = scratch()
    (d / name).write_bytes(data)
    rc, _, err = cli("train", "--data", d / name, "--out", d / "run", *TRAIN_TINY)
    assert str(d / name) in one_line_error(rc, err)
    assert not (d / "run").exists()


@pytest.fixture
def scratch():
    dirs = []

    def make():
        dirs.append(Path(tempfile.mkdtemp(prefix="flowmatch-faults-")))
        return dirs[-1]

    yield make
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def test_a_pickle_that_claims_a_huge_tensor_is_refused(cli, tmp_path):
    """torch.save's pickle claiming 10^12 elements over a 16-byte record (torch checks the record's
    size against the claim; the archive is checked before torch reads it)."""
    import pickle

    data = _torch_bytes(torch.zeros(4))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        entries = [(info, z.read(info.filename)) for info in z.infolist()]
    big = pickle.encode_long(10**12)
    big = b"\x8a" + bytes([len(big)]) + big
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w") as z:
        for info, blob in entries:
            if info.filename.endswith("data.pkl"):
                assert b"K\x04" in blob, "torch.save's pickle changed: update this test"
                blob = blob.replace(b"K\x04", big)
            z.writestr(info, blob)
    (tmp_path / "big.pt").write_bytes(f.getvalue())
    rc, _, err = cli("train", "--data", tmp_path / "big.pt", "--out", tmp_path / "run", *TRAIN_TINY)
    assert "big.pt" in one_line_error(rc, err)


def _safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("blob", [
    _safetensors({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 16),
    _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b""),
    struct.pack("<Q", 10**12) + b"{}",
], ids=["tensor-beyond-the-file", "offsets-beyond-the-file", "header-beyond-the-file"])
def test_safetensors_that_lie_about_their_size_are_refused(cli, tiny_run, tmp_path, blob):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "ema.safetensors").write_bytes(blob)
    rc, _, err = cli("sample", run, "--n", "4", "--nfe", "1", "--out", tmp_path / "x.npy", "--no-progress")
    assert "ema.safetensors" in one_line_error(rc, err)
    assert not (tmp_path / "x.npy").exists()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (and holds none)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@given(side=st.integers(9_500, 60_000), ratio=st.sampled_from([1, 2, 5]))
@example(side=100_000, ratio=1)
def test_images_that_claim_too_many_pixels_are_refused_or_skipped(scratch, side, ratio):
    """Pillow's decompression-bomb guard (a warning up to twice its limit, an error beyond) is one
    line naming the file; with --skip-bad the file is skipped like any unreadable one."""
    from PIL import Image

    if side * side * ratio <= Image.MAX_IMAGE_PIXELS:
        side = int((Image.MAX_IMAGE_PIXELS / ratio) ** 0.5) + 1
    d = scratch()
    folder = image_folder(d / "imgs", classes=("a",), per_class=3, size=8)
    bomb = folder / "a" / "bomb.png"
    bomb.write_bytes(_png_claiming(side * ratio, side))
    from flowmatch.data.images import load_image_folder

    with pytest.raises(Exception) as e:
        load_image_folder(str(folder), 8)
    assert str(bomb) in str(e.value) and type(e.value).__name__ == "UserError"
    with pytest.warns(UserWarning, match="bomb.png"):
        x, _, _ = load_image_folder(str(folder), 8, skip_bad=True)
    assert len(x) == 3


def test_cifar10_python_version_is_refused_without_unpickling(cli, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(pickle.dumps(Payload()))
    rc, _, err = cli("train", "--data", f"cifar10:{tmp_path / 'cifar'}", "--out", tmp_path / "run", *TRAIN_TINY)
    assert "never unpickles" in one_line_error(rc, err)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_pairs_json_that_lies_about_its_shards_is_refused(tmp_path):
    from flowmatch.data.pairs import check_pairs
    from flowmatch.errors import UserError

    folder = tmp_path / "pairs"
    folder.mkdir()
    meta = {"n": 10**15, "shard_size": 1, "num_shards": 10**15, "seed": 0, "shape": [2]}
    (folder / "pairs.json").write_text(json.dumps(meta))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="shards missing"):  # counted from the folder, not 10^15 checks
        check_pairs(folder)
    assert time.perf_counter() - t0 < 5
    for bad in ({**meta, "num_shards": 3}, {**meta, "shape": [2, -1]}, "[]", ""):
        (folder / "pairs.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(UserError, match="pairs.json"):
            check_pairs(folder)


# --- 2. empty and truncated files -------------------------------------------------------------

def _valid(kind: str, d: Path) -> Path:
    x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
    if kind == "npy":
        np.save(d / "data.npy", x)
    elif kind in ("npz", "npz-deflated"):
        (np.savez_compressed if kind == "npz-deflated" else np.savez)(d / "data.npz", x=x)
    elif kind == "pt":
        torch.save(torch.from_numpy(x), d / "data.pt")
    elif kind == "csv":
        np.savetxt(d / "data.csv", x, delimiter=",")
    elif kind == "image-npy":
        np.save(d / "data.npy", np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32))
    return d / ("data.npz" if kind.startswith("npz") else f"data.{'npy' if kind == 'image-npy' else kind}")


@given(kind=st.sampled_from(["npy", "npz", "npz-deflated", "pt", "csv", "image-npy"]), cut=st.floats(0, 0.999))
@example(kind="npy", cut=0.0)  # the report: an empty .npy printed "aborted" and exited 130
@example(kind="pt", cut=0.0)
@example(kind="npz", cut=0.0)
def test_empty_and_truncated_data_files_are_bad_input_never_an_interrupt(cli, scratch, kind, cut):
    d = scratch()
    f = _valid(kind, d)
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * cut)])
    rc, _, err = cli("train", "--data", f, "--out", d / "run", *TRAIN_TINY)
    assert rc in (0, 2) and "Traceback" not in err and "aborted" not in err, err
    if rc == 2:  # a cut CSV may still be a table
        assert str(f) in one_line_error(rc, err)
        assert not (d / "run").exists()


@pytest.mark.parametrize("name", ["config.json", "ema.safetensors", "trainer_state.pt"])
def test_empty_run_files_are_bad_input(cli, tiny_run, tmp_path, name):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / name).write_bytes(b"")
    if name == "trainer_state.pt":
        rc, _, err = cli("train", "--resume", "--out", run, "--no-progress")
    else:
        rc, _, err = cli("sample", run, "--n", "4", "--nfe", "1", "--out", tmp_path / "x.npy", "--no-progress")
    assert name in one_line_error(rc, err)


def test_an_empty_condition_file_is_bad_input(cli, tiny_run, tmp_path):
    (tmp_path / "c.npy").write_bytes(b"")
    rc, _, err = cli("sample", tiny_run, "--cond", tmp_path / "c.npy", "--out", tmp_path / "x.npy", "--no-progress")
    assert "c.npy" in one_line_error(rc, err)


def test_an_eof_error_escaping_any_reader_is_bad_input_naming_the_file(cli, tmp_path, monkeypatch):
    """The backstop: an EOFError that a reader let through is status 2 naming the file it read,
    never click's "aborted" and status 130."""
    from flowmatch.data import arrays

    np.save(tmp_path / "x.npy", np.ones((4, 2), dtype=np.float32))

    def read(path, key="x"):
        with open(path, "rb") as f:
            f.read()
            raise EOFError("No data left in file")

    monkeypatch.setattr(arrays, "_read", read)
    rc, _, err = cli("train", "--data", tmp_path / "x.npy", "--out", tmp_path / "run", *TRAIN_TINY)
    line = one_line_error(rc, err)
    assert str(tmp_path / "x.npy") in line and "EOFError" in line


# --- 3. options that promise tolerance --------------------------------------------------------

def _unreadable(folder: Path) -> list[Path]:
    """Unreadable files of every kind among a folder's images: garbage, empty, cut short, a bomb."""
    good = sorted(folder.rglob("*.png"))[0].read_bytes()
    bad = {"a/garbage.png": b"not an image", "a/empty.png": b"", "b/cut.png": good[:len(good) // 2],
           "b/bomb.png": _png_claiming(100_000, 100_000), "a/notes.txt": b"hello"}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in bad]


def test_skip_bad_holds_in_every_step_of_the_image_reader(cli, tmp_path):
    """Counting, allocating, caching (the rows trimmed to the readable images), holding out and
    drawing batches: the issue's report was a broadcast traceback when the cache was trimmed.
    (``train --print-config`` builds the data set, as training does, and stops there.)"""
    from flowmatch.data import make_dataset, spec_from_arg

    folder = image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=6, size=8)
    bad = _unreadable(folder)
    rc, _, err = cli("train", "--data", folder, "--image-size", "8", "--print-config")
    assert any(str(p) in one_line_error(rc, err) for p in bad)
    with pytest.warns(UserWarning, match="garbage.png"):  # skipped with a warning, as it is decoded
        rc, _, err = cli("train", "--data", folder, "--image-size", "8", "--skip-bad", "--print-config")
    assert rc == 0, err
    ds = make_dataset(spec_from_arg(str(folder), image_size=8, skip_bad=True, holdout=0.25))
    assert ds.pixels.shape == (12, 3, 8, 8) and len(ds.labels) == 12
    assert sorted([*ds.train_rows, *ds.held_rows]) == list(range(12)) and len(ds.held_rows) == 3
    assert sorted(np.unique(ds.labels).tolist()) == [0, 1]
    batch = ds.sample(16, torch.Generator().manual_seed(0))
    assert batch.x1.shape == (16, 3, 8, 8) and set(batch.label.tolist()) <= {0, 1}
    assert ds.reference(4, torch.Generator()).shape == (4, 3, 8, 8)


def test_cifar10_batches_are_memory_mapped_and_checked(cli, tmp_path):
    """CIFAR-10 is read in its binary version only: fixed-size records, memory-mapped, the size of
    each file checked; no record to skip (--skip-bad applies to image folders and is refused for
    other data, rather than ignored)."""
    from flowmatch.data.images import cached_cifar10
    from flowmatch.errors import UserError

    images, _ = write_cifar10(tmp_path / "c")
    cached = cached_cifar10(str(tmp_path / "c"))
    assert cached.pixels.shape == (len(images), 3, 32, 32)
    with open(tmp_path / "c" / "data_batch_3.bin", "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(UserError, match="data_batch_3.bin"):
        cached_cifar10(str(tmp_path / "c"))
    np.save(tmp_path / "t.npy", np.zeros((10, 2), dtype=np.float32))
    for data in (f"cifar10:{tmp_path / 'c'}", tmp_path / "t.npy", "checkerboard"):
        rc, _, err = cli("train", "--data", data, "--skip-bad", "--out", tmp_path / "r", "--print-config")
        assert "--skip-bad" in _only_line(rc, err, 2, "flowmatch: error:") and not (tmp_path / "r").exists(), err


# --- 4. a full disk ---------------------------------------------------------------------------

def _mount(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """``make(size)``: a real file system of ``size`` bytes (a tmpfs) under tmp_path; mounting needs
    root, so the test is skipped without it."""
    mounted = []

    def make(size: int = 1 << 20) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        if not _mount(folder, size):
            pytest.skip("mounting a tmpfs needs root (test_a_failed_write_at_the_lowest_layer covers the writers)")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path, leave_pages: int = 0) -> Path:
    """Fill ``disk`` with a ballast file, then give back ``leave_pages`` pages of it."""
    ballast = disk / "ballast"
    with open(ballast, "ab", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    if leave_pages:
        os.truncate(ballast, max(0, ballast.stat().st_size - 4096 * leave_pages))
    return ballast


FULL_ARGS = ["--steps", "40", "--batch-size", "32", "--width", "64", "--depth", "2", "--checkpoint-every", "20",
             "--log-every", "10", "--no-progress", "--no-plots"]


def test_disk_full_at_a_checkpoint_keeps_the_last_and_resume_continues_exactly(cli, tmp_path, small_disk, monkeypatch):
    monitoring = importlib.import_module("flowmatch.monitoring")
    with one_thread():
        ref = tmp_path / "ref"
        rc, _, err = cli("train", "--out", ref, *FULL_ARGS)
        assert rc == 0, err
        disk = small_disk(1 << 20)
        save = monitoring.RunMonitor.save

        def fills_after_the_first(monitor, state):  # then the disk fills up (another program's files, say)
            save(monitor, state)
            if state["step"] == 20:
                fill(disk, leave_pages=1)  # room for a log line, not for a checkpoint

        monkeypatch.setattr(monitoring.RunMonitor, "save", fills_after_the_first)
        run = disk / "run"
        rc, _, err = cli("train", "--out", run, *FULL_ARGS)
        line = fault_line(rc, err)
        assert str(run / "trainer_state.pt") in line and os.strerror(errno.ENOSPC) in line and "--resume" in line
        assert not _temporaries(run)
        assert torch.load(run / "trainer_state.pt", weights_only=True)["step"] == 20
        assert load_file(run / "ema.safetensors").keys() == load_file(ref / "ema.safetensors").keys()
        monkeypatch.setattr(monitoring.RunMonitor, "save", save)
        (disk / "ballast").unlink()  # room again
        rc, _, err = cli("train", "--resume", "--out", run, "--no-progress")
        assert rc == 0, err
    _same_run(ref, run)


def test_disk_full_while_sampling_writes_nothing(cli, tiny_run, small_disk):
    disk = small_disk(256 << 10)
    fill(disk)
    for name in ("x.npy", "x.png"):
        rc, _, err = cli("sample", tiny_run, "--n", "20000", "--nfe", "1", "--out", disk / name, "--no-progress")
        assert str(disk / name) in fault_line(rc, err)
        assert sorted(p.name for p in disk.iterdir()) == ["ballast"]


def test_disk_full_while_writing_pairs_keeps_the_shards_and_resume_finishes(cli, tiny_run, small_disk, monkeypatch):
    reflow = importlib.import_module("flowmatch.reflow")
    disk = small_disk(1 << 20)
    save = reflow.save_weights

    def fills_after_the_second(path, *args, **kwargs):
        save(path, *args, **kwargs)
        if Path(path).name == "shard-00001.safetensors":
            fill(disk)

    monkeypatch.setattr(reflow, "save_weights", fills_after_the_second)
    out = disk / "student"
    common = ["--pairs", "4000", "--shard-size", "1000", "--teacher-nfe", "2", "--steps", "4", "--batch-size", "16",
              "--no-progress", "--no-plots"]
    rc, _, err = cli("reflow", tiny_run, "--out", out, *common)
    line = fault_line(rc, err)
    assert "shard-00002.safetensors" in line and "--resume" in line
    assert sorted(p.name for p in (out / "pairs").glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not _temporaries(out)
    monkeypatch.setattr(reflow, "save_weights", save)
    (disk / "ballast").unlink()
    rc, _, err = cli("reflow", tiny_run, "--out", out, "--resume", *common)
    assert rc == 0, err
    assert len(list((out / "pairs").glob("shard-*"))) == 4


def test_disk_full_while_caching_images(cli, tmp_path, small_disk, monkeypatch):
    from flowmatch.data.images import cached_image_folder

    folder = image_folder(tmp_path / "imgs", per_class=3, size=8)
    disk = small_disk(256 << 10)
    cache = disk / "cache"
    cache.mkdir()
    monkeypatch.setenv("FLOWMATCH_IMAGE_CACHE", str(cache))
    ballast = fill(disk)
    rc, _, err = cli("train", "--data", folder, "--image-size", "8", "--out", tmp_path / "run", *TRAIN_TINY)
    assert str(cache) in fault_line(rc, err)
    assert not _temporaries(cache) and not list(cache.glob("*.json")) and not (tmp_path / "run").exists()
    ballast.unlink()
    assert cached_image_folder(str(folder), 8).pixels.shape == (6, 3, 8, 8)


def test_a_line_that_does_not_fit_is_taken_back_whole(small_disk):
    from flowmatch.errors import EnvironmentFault
    from flowmatch.files import append_line

    disk = small_disk(64 << 10)
    log = disk / "metrics.jsonl"
    log.write_text("x" * 4095 + "\n")  # one whole page: the next line needs another
    fill(disk)
    with pytest.raises(EnvironmentFault, match=re.escape(str(log))):
        append_line(log, json.dumps({"step": 1, "loss": 0.5}) + "\n")
    assert log.read_text() == "x" * 4095 + "\n"


def test_a_failed_write_at_the_lowest_layer(cli, tiny_run, tmp_path, monkeypatch):
    """Without root (no tmpfs), and for every writer that goes through files.atomic_file: a write
    that fails with ENOSPC at the lowest layer is one line naming the file, status 1, the previous
    file unchanged and no temporary file left."""
    from flowmatch import files
    from flowmatch.errors import EnvironmentFault

    def full(self, data):
        self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise self.error

    target = tmp_path / "state.pt"
    files.save_state(target, {"step": 1})
    before = target.read_bytes()
    monkeypatch.setattr(files._Writer, "write", full)
    for write in (lambda: files.save_state(target, {"step": 2, "w": torch.zeros(1000)}),
                  lambda: files.write_text(target, "x"), lambda: files.write_json(target, {"a": 1})):
        with pytest.raises(EnvironmentFault, match="No space left on device"):
            write()
        assert target.read_bytes() == before and not _temporaries(tmp_path)
    rc, _, err = cli("sample", tiny_run, "--n", "8", "--nfe", "1", "--out", tmp_path / "x.npy", "--no-progress")
    assert "x.npy" in fault_line(rc, err) and not (tmp_path / "x.npy").exists() and not _temporaries(tmp_path)


# --- 5. SIGTERM -------------------------------------------------------------------------------

SIGTERM_ARGS = ["--steps", "150", "--batch-size", "16", "--width", "16", "--depth", "1", "--checkpoint-every", "1000",
                "--log-every", "10", "--warmup-steps", "5", "--no-plots", "--no-progress"]


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def test_sigterm_checkpoints_train_and_resume_continues_bit_exactly(cli, tmp_path):
    with one_thread():
        ref = tmp_path / "ref"
        rc, _, err = cli("train", "--out", ref, *SIGTERM_ARGS)
        assert rc == 0, err
        run = tmp_path / "run"
        p = subprocess.Popen([sys.executable, "-m", "flowmatch", "train", "--out", str(run), *SIGTERM_ARGS], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 120
            while _logged_step(run) < 30 and time.time() < deadline and p.poll() is None:
                time.sleep(0.02)
            # 6. a second command on the same run while it trains: refused in one line, the run untouched
            rc, _, err = cli("train", "--out", run, *SIGTERM_ARGS)
            assert str(run) in one_line_error(rc, err)
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        line = stop_line(p.returncode, err)
        assert "--resume" in line and str(run) in line
        step = int(line.split("at step ")[1].split()[0])
        assert 30 <= step < 150
        assert torch.load(run / "trainer_state.pt", weights_only=True)["step"] == step
        assert not _temporaries(run)
        rc, _, err = cli("train", "--resume", "--out", run, "--no-progress")
        assert rc == 0, err
    _same_run(ref, run)


def test_sigterm_stops_reflow_after_a_shard_and_resume_gives_the_same_student(cli, tiny_run, tmp_path, monkeypatch):
    reflow = importlib.import_module("flowmatch.reflow")
    handler = signal.getsignal(signal.SIGTERM)
    common = ["--pairs", "200", "--shard-size", "50", "--teacher-nfe", "4", "--steps", "20", "--batch-size", "32",
              "--no-progress", "--no-plots"]
    full = tmp_path / "full"
    rc, _, err = cli("reflow", tiny_run, "--out", full, *common)
    assert rc == 0, err
    save = reflow.save_weights

    def terminated_after_the_second(path, *args, **kwargs):  # a real SIGTERM, to this process
        save(path, *args, **kwargs)
        if Path(path).name == "shard-00001.safetensors":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(reflow, "save_weights", terminated_after_the_second)
    stopped = tmp_path / "stopped"
    rc, _, err = cli("reflow", tiny_run, "--out", stopped, *common)
    assert "--resume" in stop_line(rc, err)
    assert sorted(p.name for p in (stopped / "pairs").glob("shard-*")) == ["shard-00000.safetensors",
                                                                          "shard-00001.safetensors"]
    monkeypatch.setattr(reflow, "save_weights", save)
    rc, _, err = cli("reflow", tiny_run, "--out", stopped, "--resume", *common)
    assert rc == 0, err
    _same_run(full, stopped)
    assert signal.getsignal(signal.SIGTERM) is handler  # the handlers were put back


def test_sigterm_stops_sample_between_batches_writing_nothing(cli, tiny_run, tmp_path, monkeypatch):
    from flowmatch import sampling

    batches = sampling.sample_batches

    def terminated_after_the_first(*args, **kwargs):
        for k, batch in enumerate(batches(*args, **kwargs)):
            if k == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(sampling, "sample_batches", terminated_after_the_first)
    out = tmp_path / "x.npy"
    rc, _, err = cli("sample", tiny_run, "--n", "40", "--batch-size", "10", "--nfe", "1", "--out", out, "--no-progress")
    assert "nothing was written" in stop_line(rc, err)
    assert not out.exists() and not _temporaries(tmp_path)


def test_sigterm_elsewhere_stops_at_once_leaving_no_temporary_file(cli, tiny_run, tmp_path, monkeypatch):
    """A command without a safe point (here: save-pretrained, while its weights file is being
    written) stops at once, its temporary file removed: one line, status 143."""
    files = importlib.import_module("flowmatch.files")
    save_file = files.save_file

    def terminated_while_writing(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(files, "save_file", terminated_while_writing)
    out = tmp_path / "hub"
    rc, _, err = cli("save-pretrained", tiny_run, "--out", out)
    stop_line(rc, err)
    assert out.is_dir() and not list(out.iterdir())  # nothing written, no temporary file


# --- 6. two processes on one file -------------------------------------------------------------

def test_an_output_written_by_another_process_meanwhile_is_not_replaced(cli, tiny_run, tmp_path, monkeypatch):
    """sample --out checks that the file is absent, samples, then writes: another process writes the
    same file in between. Without --overwrite the other's file stays, and the command says so."""
    from flowmatch import sampling

    out = tmp_path / "x.npy"
    batches = sampling.sample_batches

    def another_process_writes_it(*args, **kwargs):
        yield from batches(*args, **kwargs)
        subprocess.run([sys.executable, "-c", f"open({str(out)!r}, 'w').write('theirs')"], check=True)

    monkeypatch.setattr(sampling, "sample_batches", another_process_writes_it)
    rc, _, err = cli("sample", tiny_run, "--n", "8", "--nfe", "1", "--out", out, "--no-progress")
    assert "--overwrite" in one_line_error(rc, err)
    assert out.read_text() == "theirs" and not _temporaries(tmp_path)
    rc, _, err = cli("sample", tiny_run, "--n", "8", "--nfe", "1", "--out", out, "--no-progress", "--overwrite")
    assert rc == 0, err
    assert np.load(out).shape == (8, 2)


RACER = """
import sys
from flowmatch.data.images import cached_image_folder
print(cached_image_folder(sys.argv[1], 8).pixels.shape[0])
"""


def _held(lock: Path) -> bool:
    import fcntl

    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_two_processes_caching_one_folder_share_one_entry(tmp_path, monkeypatch):
    """Another process decodes a folder into the cache; this one asks for the same entry meanwhile:
    it waits for the other's entry and reads it (one entry, no temporary file)."""
    from flowmatch.data.images import cached_image_folder

    folder = image_folder(tmp_path / "imgs", per_class=150, size=24)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLOWMATCH_IMAGE_CACHE", str(cache))
    other = subprocess.Popen([sys.executable, "-c", RACER, str(folder)], env={**ENV, "FLOWMATCH_IMAGE_CACHE": str(cache)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and other.poll() is None and not any(_held(f) for f in cache.glob("*.lock")):
        time.sleep(0.005)
    mine = cached_image_folder(str(folder), 8)
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    assert int(out) == len(mine.pixels) == 300
    assert len(list(cache.glob("*.json"))) == 1 and not _temporaries(cache)


# --- 7. files from others ---------------------------------------------------------------------

def test_a_data_file_with_a_pickle_payload_runs_no_code(cli, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save(Payload(), tmp_path / "evil.pt")
    np.save(tmp_path / "evil.npy", np.array([Payload(), Payload()], dtype=object), allow_pickle=True)
    for name in ("evil.pt", "evil.npy"):
        rc, _, err = cli("train", "--data", tmp_path / name, "--out", tmp_path / "run", *TRAIN_TINY)
        assert name in one_line_error(rc, err)
    assert not marker.exists()


def test_trust_guide_names_what_executes():
    text = (Path(__file__).parents[1] / "docs" / "guides" / "trust.md").read_text()
    for word in ("safetensors", "weights_only=True", "TorchScript", "--perceptual", "--fid-weights", "allow_pickle=False"):
        assert word in text


def test_a_config_json_claiming_a_huge_sample_is_bad_input(cli, tiny_run, tmp_path):
    """A run whose config.json claims samples too large for any network is refused naming the file,
    before a network is built (it ended as 'out of memory', exit 1)."""
    import json

    from helpers import copy_run, one_line_error

    run = copy_run(tiny_run, tmp_path / "run")
    doc = json.loads((run / "config.json").read_text())
    doc["shape"] = [3, 100000, 100000]
    (run / "config.json").write_text(json.dumps(doc))
    rc, _, err = cli("sample", run, "--n", "4", "--out", tmp_path / "x.npy")
    assert "config.json" in one_line_error(rc, err) and "shape" in err
    assert not (tmp_path / "x.npy").exists()
