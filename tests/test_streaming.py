"""Streaming image data: the uint8 cache (decoded once, reused, invalidated), batches through the
DataLoader (equal to the decoded images, the same for any worker count, resumable), --hflip, and
CIFAR-10's binary batches (files written here in the official format)."""

import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

import flowmatch.data.images as images_module
from flowmatch.config import TrainConfig
from flowmatch.data import make_dataset, spec_from_arg
from flowmatch.data.cifar10 import read_batch
from flowmatch.data.images import load_image_folder
from flowmatch.data.loader import batches
from flowmatch.training import train

from helpers import image_folder, one_line_error, write_cifar10


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("FLOWMATCH_IMAGE_CACHE", str(folder))
    return folder


@pytest.fixture
def decodes(monkeypatch):
    """How many image files were decoded (counted in the decoder itself)."""
    count = [0]
    real = images_module._load_image

    def counting(*args):
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(images_module, "_load_image", counting)
    return count


def test_cache_is_written_once_reused_and_invalidated(tmp_path, cache, decodes):
    folder = image_folder(tmp_path / "imgs")
    spec = spec_from_arg(str(folder), image_size=8)
    first = make_dataset(spec)
    assert decodes[0] == 8 and len(list(cache.glob("*.json"))) == 1
    again = make_dataset(spec)
    assert decodes[0] == 8  # the second build reads the cache: no decode
    assert np.array_equal(first.pixels.array, again.pixels.array) and first.pixels.array.dtype == np.uint8

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "b" / "new.png")  # a file added
    added = make_dataset(spec_from_arg(str(folder), image_size=8))
    assert decodes[0] == 8 + 9 and len(added.pixels) == 9
    assert len(list(cache.glob("*.json"))) == 1  # the outdated entry is gone

    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(folder / "b" / "new.png")  # a file changed
    changed = make_dataset(spec_from_arg(str(folder), image_size=8))
    assert decodes[0] == 8 + 9 + 9
    assert changed.pixels.array[-1].min() == 255 and added.pixels.array[-1].max() == 0
    make_dataset(spec_from_arg(str(folder), image_size=4))  # another size: another entry, beside this one
    assert len(list(cache.glob("*.json"))) == 2


def test_a_killed_decode_leaves_no_entry(tmp_path, cache, monkeypatch):
    folder = image_folder(tmp_path / "imgs")
    real, calls = images_module._load_image, [0]

    def dies_at_the_fifth(*args):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(images_module, "_load_image", dies_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(spec_from_arg(str(folder), image_size=8))
    assert sorted(p.suffix for p in cache.iterdir()) == [".lock"]  # no half-written pixels, no entry
    monkeypatch.setattr(images_module, "_load_image", real)
    assert len(make_dataset(spec_from_arg(str(folder), image_size=8)).pixels) == 8


def test_cached_batches_equal_the_decoded_images(tmp_path, cache):
    folder = image_folder(tmp_path / "imgs", size=8)
    x, y, classes = load_image_folder(str(folder), 8)  # the in-memory float32 loader
    first = Image.open(folder / "a" / "0.png")
    assert torch.equal(x[0], torch.from_numpy(np.asarray(first, np.float32) / 255.0).permute(2, 0, 1))
    ds = make_dataset(spec_from_arg(str(folder), image_size=8, holdout=0.25))
    assert ds.classes == classes and torch.equal(torch.from_numpy(ds.labels), y)
    assert torch.equal(ds.pixels.rows(np.arange(8)), x)  # exactly: uint8 / 255 as the decoder's float32 / 255
    assert len(ds.train_rows) == 6 and sorted([*ds.train_rows, *ds.held_rows]) == list(range(8))
    # sample(): the rows the generator picks among the training rows, as before the cache
    g = torch.Generator().manual_seed(3)
    b = ds.sample(16, g)
    idx = torch.randint(6, (16,), generator=torch.Generator().manual_seed(3))
    rows = torch.from_numpy(ds.train_rows)[idx]
    assert torch.equal(b.x1, (x[rows] - 0.5) / 0.5) and torch.equal(b.label, y[rows])
    # the DataLoader's draws: training rows only, each image exactly as decoded
    draws = ds.draws(32, seed=7)
    for k in range(3):
        item = draws[k]
        for img, label in zip(item["x1"], item["label"]):
            match = [r for r in ds.train_rows if torch.equal(img, (x[r] - 0.5) / 0.5)]
            assert len(match) == 1 and label == y[match[0]]


def test_batches_do_not_depend_on_workers_or_where_the_stream_starts(tmp_path, cache):
    folder = image_folder(tmp_path / "imgs")
    ds = make_dataset(spec_from_arg(str(folder), image_size=8))
    draws = ds.draws(5, seed=11, hflip=True)
    direct = [draws[k] for k in range(2, 8)]
    for workers in (0, 2):
        got = list(itertools.islice(batches(draws, 2, workers, "cpu"), 6))
        assert all(torch.equal(a["x1"], x1) and torch.equal(a["label"], lab) for a, (x1, lab) in zip(direct, got))
    assert not torch.equal(draws[0]["x1"], draws[1]["x1"])


def test_hflip_flips_half_and_changes_nothing_else(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (8, 1))  # left-right asymmetric
    imgs = np.stack([ramp[None], (ramp ** 2)[None]])  # (2, 1, 8, 8)
    np.save(tmp_path / "x.npy", imgs)
    ds = make_dataset(spec_from_arg(str(tmp_path / "x.npy"), holdout=0.0))
    x = torch.from_numpy(imgs) * 2 - 1
    mirrored = 0
    for hflip in (False, True):
        batch = ds.draws(400, seed=0, hflip=hflip)[0]["x1"]
        for img in batch:
            plain = any(torch.equal(img, x[i]) for i in range(2))
            flipped = any(torch.equal(img, x[i].flip(-1)) for i in range(2))
            assert plain != flipped  # exactly one of the images, or exactly its mirror
            mirrored += flipped
        if not hflip:
            assert mirrored == 0
    assert 160 <= mirrored <= 240  # Binomial(400, 1/2): 200 +- 2 x 4 sd


def test_hflip_is_refused_on_vector_data(cli, tmp_path):
    line = one_line_error(*cli("train", "--data", "moons", "--hflip", "--out", tmp_path / "run", "--steps", "2")[::2])
    assert "--hflip" in line and "moons" in line
    assert not (tmp_path / "run").exists()


def test_an_image_run_resumes_exactly(tmp_path, cache):
    """The stream restarts at the checkpoint's draw: 4 steps in one go equal 2 + 2, hflip on,
    loaded in the training process and then by a worker."""
    folder = image_folder(tmp_path / "imgs")
    common = dict(data=str(folder), image_size=8, unet="tiny", batch_size=4, hflip=True, plots=False, warmup_steps=1,
                  checkpoint_every=2)
    train(TrainConfig(steps=4, workers=0, **common), out=tmp_path / "whole", progress=False)
    train(TrainConfig(steps=2, workers=1, **common), out=tmp_path / "split", progress=False)
    train(None, out=tmp_path / "split", resume=True, steps=4, progress=False)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- CIFAR-10, binary version ---

def test_cifar10_binary_pixels_planes_and_labels(tmp_path, cache):
    images, labels = write_cifar10(tmp_path / "cifar-10-batches-bin")
    ds = make_dataset(spec_from_arg(f"cifar10:{tmp_path}"))  # the parent folder finds cifar-10-batches-bin/
    assert ds.shape == (3, 32, 32) and ds.num_classes == 10 and ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    chw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    assert torch.equal((ds.pixels.rows(np.arange(14)) * 255).round().to(torch.uint8), chw)
    assert ds.labels.tolist() == labels.tolist()
    assert ds.train_rows.tolist() == list(range(11)) and ds.held_rows.tolist() == [11, 12, 13]  # test_batch.bin held out
    ref = ds.reference(20, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(r, chw[k].float() / 255) for k in (11, 12, 13)) for r in ref)


def test_cifar10_trains_end_to_end(cli, tmp_path):
    write_cifar10(tmp_path / "bin")
    run = tmp_path / "run"
    rc, _, err = cli("train", "--data", f"cifar10:{tmp_path / 'bin'}", "--steps", "3", "--unet", "tiny", "--batch-size", "4",
                     "--hflip", "--no-progress", "--no-plots", "--out", run)
    assert rc == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["name"] == "cifar10" and cfg["shape"] == [3, 32, 32] and cfg["num_classes"] == 10
    assert cfg["train"]["hflip"] is True and (run / "ema.safetensors").exists()


@pytest.mark.parametrize("case", ["truncated", "missing-file", "missing-dir", "bad-label"])
def test_cifar10_bad_input_names_the_file(cli, tmp_path, case):
    root = tmp_path / "bin"
    write_cifar10(root)
    named = root / "data_batch_3.bin"
    if case == "truncated":
        named.write_bytes(named.read_bytes()[:-100])
    elif case == "missing-file":
        named = root / "test_batch.bin"
        named.unlink()
    elif case == "missing-dir":
        root = named = tmp_path / "nowhere"
    else:
        raw = bytearray(named.read_bytes())
        raw[3073] = 12  # the second record's label
        named.write_bytes(bytes(raw))
    line = one_line_error(*cli("train", "--data", f"cifar10:{root}", "--steps", "2", "--unet", "tiny",
                               "--out", tmp_path / "run")[::2])
    assert str(named) in line
    assert not (tmp_path / "run").exists()


@given(counts=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_cifar10_records_round_trip(counts, seed):
    """Any number of records with any labels: a record written in the format reads back exactly."""
    rng = np.random.default_rng(seed)
    n = sum(counts)
    img = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    lab = rng.integers(0, 10, n)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "data_batch_1.bin"
        f.write_bytes(b"".join(bytes([lab[i]]) + img[i].tobytes() for i in range(n)))
        x, y = read_batch(f)
        assert np.array_equal(x, img) and y.tolist() == lab.tolist()
