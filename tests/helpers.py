"""What the tests build, in one place: budgets that make a command tiny, the bad-input check, tiny
diffusers pipelines, image folders, CIFAR-10 batches, and the exact-W2 reference. Plain functions;
the fixtures built from them are in conftest.py, the test problems with closed forms in problems.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: a tiny MLP and no progress bar: appended to a train command, the network is small
TINY = ["--width", "32", "--depth", "2", "--no-progress"]
#: a whole train command's budget for tests of behaviour, not quality: two steps of the tiniest network
TRAIN_TINY = ["--steps", "2", "--batch-size", "16", "--width", "16", "--depth", "1", "--no-progress", "--no-plots"]


def one_line_error(rc, err):
    """Bad input: exit status 2 and exactly one line on stderr, no traceback; returns the line."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("flowmatch: error:"), err
    assert "Traceback" not in err
    return lines[0]


def plain_help(text: str) -> str:
    """``--help`` output as one line of words: the panels' box characters and line breaks removed."""
    import re

    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def copy_run(src, dst):
    """A writable copy of a run directory's files (for tests that change or damage it)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def tiny_ddpm(folder: Path, size: int = 8, class_embeds: int | None = None, timesteps: int = 100,
              class_scale: float = 1.0) -> Path:
    """An untrained diffusers DDPM pipeline (grey images of ``size`` x ``size``), saved the usual way
    (``DDPMPipeline.save_pretrained``); ``class_embeds``: a class-conditional UNet with that many
    class embeddings, scaled by ``class_scale`` so that classes change the output."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=size, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           norm_num_groups=4, num_class_embeds=class_embeds)
    if class_embeds and class_scale != 1.0:
        with torch.no_grad():
            unet.class_embedding.weight.mul_(class_scale)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=timesteps)).save_pretrained(folder)
    return Path(folder)


def image_folder(root: Path, classes=("a", "b"), per_class: int = 4, size: int = 8, seed: int = 0) -> Path:
    """A folder of random RGB PNGs, one subfolder per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def write_cifar10(root: Path, counts=(3, 2, 2, 2, 2, 3), seed: int = 0):
    """CIFAR-10's official binary layout, with few records: ``images`` (n, 32, 32, 3) as an image
    library holds them (row, column, RGB), written as label byte + R plane + G plane + B plane.
    Returns the images and labels written, in file order."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]
    images, labels = [], []
    for name, n in zip(names, counts):
        img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        lab = rng.integers(0, 10, n, dtype=np.uint8)
        records = [bytes([lab[i]]) + img[i, :, :, 0].tobytes() + img[i, :, :, 1].tobytes() + img[i, :, :, 2].tobytes()
                   for i in range(n)]
        (root / name).write_bytes(b"".join(records))
        images.append(img), labels.append(lab)
    (root / "batches.meta.txt").write_text("\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                      "horse", "ship", "truck"]) + "\n\n")
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def optimal_assignment(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, float]:
    """The squared-distance matrix's optimal permutation between equal-size point sets, by
    scipy's Hungarian method (an exact reference, independent of POT): for each row of ``a`` the
    row of ``b`` it goes with, and the mean squared distance of that assignment."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)], float(cost[rows, cols].mean())


def exact_w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """W2 between two equal-size, equal-weight point clouds: the optimal plan is a permutation."""
    return float(np.sqrt(optimal_assignment(a, b)[1]))
