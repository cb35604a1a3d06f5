"""Memory and speed of the streaming image path on folders of 10,000 and 100,000 32x32 PNGs: decoding into the
uint8 cache, opening it, loading a batch, 40 steps of ``--unet tiny`` (batch 32, one thread), each in a fresh
process that samples its ``RssAnon`` and ``RssFile`` and its DataLoader workers' private dirty memory every
20 ms. ``--baseline`` adds the previous loader's row (decoded to float32 in memory and split, no training).

    python benchmarks/image_memory.py --baseline           # both sizes, a table on stdout
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT, STEPS, BATCH = Path("/tmp/flowmatch-bench-images"), 40, 32


def make_folder(n: int) -> Path:
    """``n`` 32x32 PNGs of blurred noise with a bright disc (10 class folders), written once."""
    from PIL import Image, ImageFilter

    folder = ROOT / f"png-{n}"
    if (folder / ".complete").exists():
        return folder
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[:32, :32]
    for i in range(n):
        noise = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
        cx, cy, r = rng.integers(4, 28, 3)
        arr = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2))).copy()
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < (r // 2 + 2) ** 2] = (230, 200, 40)
        (folder / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"c{i % 10}" / f"{i:06d}.png")
    (folder / ".complete").write_text(str(n))
    return folder


def read_proc(path: str, key: str) -> int:
    """The sum of a /proc file's ``key`` lines, in bytes (0 when it is gone)."""
    try:
        with open(path) as f:
            return sum(int(ln.split()[1]) * 1024 for ln in f if ln.split(":")[0] == key)
    except OSError:
        return 0


@contextlib.contextmanager
def peaks():
    """Peak RssAnon, RssFile and the workers' summed private dirty memory while the block runs (every 20 ms)."""
    out, stop, me = {"main": 0, "file": 0, "workers": 0}, threading.Event(), os.getpid()
    children = Path(f"/proc/{me}/task/{me}/children")

    def sample():
        while not stop.is_set():
            kids = children.read_text().split() if children.exists() else []
            now = {"main": read_proc(f"/proc/{me}/status", "RssAnon"), "file": read_proc(f"/proc/{me}/status", "RssFile"),
                   "workers": sum(read_proc(f"/proc/{c}/smaps_rollup", "Private_Dirty") for c in kids)}
            out.update({k: max(out[k], v) for k, v in now.items()})
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()


def child(n: int, folder: str, baseline: bool) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    from diffusers import UNet2DModel  # noqa: F401 (imported before the start is read: both rows start alike)

    from flowmatch.config import TrainConfig
    from flowmatch.data import make_dataset, spec_from_arg
    from flowmatch.data.images import load_image_folder
    from flowmatch.data.loader import default_workers
    from flowmatch.training import train

    torch.set_num_threads(1)
    row = {"images": n, "start": read_proc("/proc/self/status", "RssAnon")}
    if baseline:  # the previous loader: every image decoded to float32, then split into copies
        with peaks() as peak:
            t0 = time.perf_counter()
            x, _, _ = load_image_folder(folder, 32)
            row["decode_s"], perm = time.perf_counter() - t0, torch.randperm(len(x))
            held, x = x[perm[:len(x) // 10]], x[perm[len(x) // 10:]]
        return row | {"loader": "float32 in memory (before; decode and split only)", "main": peak["main"], "workers": 0,
                      "file": peak["file"], "data_bytes": (x.numel() + held.numel()) * 4}
    spec = spec_from_arg(folder, image_size=32)
    with peaks() as peak, tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_dataset(spec)  # decodes into the (empty) cache
        row["decode_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        ds = make_dataset(spec)  # the cache, opened
        row["cache_open_s"], draws, t0 = time.perf_counter() - t0, ds.draws(BATCH, seed=0, hflip=True), time.perf_counter()
        for k in range(200):
            draws[k]
        row["load_ms"] = (time.perf_counter() - t0) / 200 * 1e3
        train(TrainConfig(data=folder, unet="tiny", steps=STEPS, batch_size=BATCH, checkpoint_every=10**6, log_every=STEPS,
                          plots=False, hflip=True), out=Path(tmp) / "run", progress=False)
        row["step_ms"] = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1])["time"] / STEPS * 1e3
    workers = default_workers(len(ds.train_rows), in_memory=False)
    return row | {"loader": f"uint8 memmap, {workers} worker(s) (auto)", "main": peak["main"], "workers": peak["workers"],
                  "file": peak["file"], "data_bytes": int(np.prod(ds.pixels.shape))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="folder sizes (images)")
    p.add_argument("--baseline", action="store_true", help="also measure the previous float32 in-memory loader")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.child[2] == "1")))
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for baseline in "01"[:1 + args.baseline]:
            with tempfile.TemporaryDirectory() as cache:  # an empty cache: the first build decodes
                out = subprocess.run([sys.executable, __file__, "--child", str(n), str(make_folder(n)), baseline],
                                     env={**os.environ, "FLOWMATCH_CACHE": cache}, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| images | loader | pixels | RssAnon after imports | peak RssAnon, training process | peak private memory, workers (sum) "
          "| peak RssFile | decode | cache open | batch load (in process) | training step |\n" + "|---" * 11 + "|")
    for r in rows:
        mb = {k: f"{r[k] / 2**20:.0f} MB" for k in ("data_bytes", "start", "main", "workers", "file")}
        rest = f"{r['cache_open_s']:.2f} s | {r['load_ms']:.2f} ms | {r['step_ms']:.0f} ms" if "step_ms" in r else "- | - | -"
        print(f"| {r['images']:,} | {r['loader']} | {mb['data_bytes']} | {mb['start']} | {mb['main']} | {mb['workers']} | {mb['file']} "
              f"| {r['decode_s']:.1f} s | {rest} |")


if __name__ == "__main__":
    main()
