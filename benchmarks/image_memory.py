"""Memory and speed of the streaming image path: folders of 10,000 and 100,000 32x32 PNGs.

For each folder (written once into --root with Pillow, reused when present): the first build
decodes it into the uint8 cache (timed), a second build opens the cache (timed), a batch's
loading time is measured in the training process, then ``--steps`` training steps run
(``--unet tiny``). Each measurement runs in a fresh child process that samples the anonymous
resident memory of itself (``RssAnon`` in /proc/PID/status: memory the data set could grow; the
memory-mapped cache's pages are file-backed, reclaimable, and counted apart as ``RssFile``) and
the private dirty memory of its DataLoader workers (smaps_rollup: what each worker holds beyond
the pages it shares with the training process it was forked from) every 20 ms. ``--baseline``
adds the previous loader's row: the whole folder decoded to float32 in memory and split.

    python benchmarks/image_memory.py --baseline           # both sizes, a table on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int, size: int = 32) -> Path:
    """``n`` PNGs of blurred noise with a bright disc (10 class folders), written once:
    ``.complete`` marks a finished folder, so an interrupted one is finished, not restarted."""
    from PIL import Image, ImageFilter

    folder = root / f"png-{n}"
    if (folder / ".complete").exists():
        return folder
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        f = folder / f"c{i % 10}" / f"{i:06d}.png"
        if f.exists():
            rng.integers(0, 255, (size, size, 3)), rng.integers(4, size - 4, 3)  # keep the stream aligned
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
        cx, cy, r = rng.integers(4, size - 4, 3)
        im = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2))
        arr = np.asarray(im).copy()
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < (r // 2 + 2) ** 2] = (230, 200, 40)
        Image.fromarray(arr).save(f)
    (folder / ".complete").write_text(str(n))
    return folder


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _private_dirty(pid: int) -> int:
    """A worker's own memory: its private dirty pages (anonymous memory it wrote, not the pages it
    shares copy-on-write with the training process it was forked from, which RssAnon counts again)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Private_Dirty:"))
    except OSError:
        return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class Peak:
    """Peak RssAnon and RssFile of this process and (summed) private dirty memory of its child
    processes (the DataLoader's workers), sampled every 20 ms."""

    def __init__(self):
        self.main = self.workers = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            s = _status(me)
            self.main = max(self.main, s.get("RssAnon", 0))
            self.file = max(self.file, s.get("RssFile", 0))
            self.workers = max(self.workers, sum(_private_dirty(c) for c in _children(me)))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child(args) -> dict:
    """One measurement, in this (fresh) process; returns its numbers."""
    import torch
    from diffusers import UNet2DModel  # noqa: F401 (imported before the start is read: both rows start alike)

    from flowmatch.config import TrainConfig
    from flowmatch.data import make_dataset, spec_from_arg
    from flowmatch.data.loader import default_workers
    from flowmatch.training import train

    torch.set_num_threads(args.threads)
    row = {"images": args.n, "start": _status(os.getpid())["RssAnon"]}
    if args.baseline:  # the previous loader: every image decoded to float32 and held in memory
        from flowmatch.data.images import load_image_folder

        with Peak() as peak:
            t0 = time.perf_counter()
            x, y, _ = load_image_folder(args.folder, args.image_size)
            row["decode_s"] = time.perf_counter() - t0
            perm = torch.randperm(len(x))  # the split the previous loader made: copies of the rows
            k = len(x) // 10
            held, x = x[perm[:k]], x[perm[k:]]
        row.update(loader="float32 in memory (before; decode and split only)", peak_anon_main=peak.main, peak_anon_workers=0,
                   peak_file=peak.file, data_bytes=(x.numel() + held.numel()) * 4)
        return row
    spec = spec_from_arg(args.folder, image_size=args.image_size)
    with Peak() as peak:
        t0 = time.perf_counter()
        ds = make_dataset(spec)  # decodes into the (empty) cache
        row["decode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = make_dataset(spec)  # the cache, opened
        row["cache_open_s"] = time.perf_counter() - t0
        draws = ds.draws(args.batch_size, seed=0, hflip=True)
        t0 = time.perf_counter()
        for k in range(200):
            draws[k]
        row["load_ms_per_batch"] = (time.perf_counter() - t0) / 200 * 1e3
        cfg = TrainConfig(data=args.folder, image_size=args.image_size, unet="tiny", steps=args.steps,
                          batch_size=args.batch_size, checkpoint_every=10**6, log_every=args.steps, plots=False,
                          hflip=True, workers=args.workers)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train(cfg, out=Path(tmp) / "run", progress=False)
            row["train_s"] = time.perf_counter() - t0
            metrics = [json.loads(ln) for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    row["step_ms"] = metrics[-1]["time"] / args.steps * 1e3
    workers = cfg.workers if cfg.workers is not None else default_workers(len(ds.train_rows), in_memory=False)
    row.update(loader=f"uint8 memmap, {workers} worker(s)" + (" (auto)" if cfg.workers is None else ""),
               peak_anon_main=peak.main, peak_anon_workers=peak.workers, peak_file=peak.file,
               data_bytes=int(np.prod(ds.pixels.shape)))
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="folder sizes (images)")
    p.add_argument("--root", default="/tmp/flowmatch-bench-images", help="where the folders are written (reused)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: flowmatch's auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--baseline", action="store_true", help="also measure the previous float32 in-memory loader")
    p.add_argument("--make-only", action="store_true", help="write the folders and stop")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    folders = {n: make_folder(Path(args.root), n, args.image_size) for n in sizes}
    if args.make_only:
        return
    rows = []
    for n in sizes:
        for baseline in ([False, True] if args.baseline else [False]):
            with tempfile.TemporaryDirectory() as cache:  # an empty cache: the first build decodes
                cmd = [sys.executable, __file__, "--child", "--n", str(n), "--folder", str(folders[n]),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--image-size",
                       str(args.image_size), "--threads", str(args.threads)]
                cmd += (["--workers", str(args.workers)] if args.workers is not None else []) + (["--baseline"] if baseline else [])
                out = subprocess.run(cmd, env={**os.environ, "FLOWMATCH_CACHE": cache}, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr)
    mb = 2**20
    print("| images | loader | pixels | RssAnon after imports | peak RssAnon, training process | peak private memory, "
          "workers (sum) | peak RssFile | decode | cache open | batch load (in process) | training step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        before = r["loader"].startswith("float32")
        print(f"| {r['images']:,} | {r['loader']} | {r['data_bytes'] / mb:.0f} MB | {r['start'] / mb:.0f} MB "
              f"| {r['peak_anon_main'] / mb:.0f} MB | {r['peak_anon_workers'] / mb:.0f} MB | {r['peak_file'] / mb:.0f} MB "
              f"| {r['decode_s']:.1f} s | "
              + ("- | - | - |" if before else f"{r['cache_open_s']:.2f} s | {r['load_ms_per_batch']:.2f} ms | {r['step_ms']:.0f} ms |"))


if __name__ == "__main__":
    main()
