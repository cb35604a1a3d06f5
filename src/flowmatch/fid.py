"""FID (Heusel et al. 2017) and precision/recall of image samples in the features of a network
the user supplies: ``flowmatch eval RUN --fid-weights FILE``.

Inception weights cannot be downloaded on every machine, so the user points at a file they have.

- **The file** is a TorchScript network (written by ``torch.jit.save``), loaded with
  ``torch.jit.load``: the format of ``inception-2015-12-05.pt``, the FID Inception network that
  clean-fid and NVIDIA's StyleGAN metrics use (pytorch-fid's ``pt_inception-*.pth`` is a state
  dict for a network torchvision builds, and StyleGAN's ``.pkl`` a Python pickle: neither is
  taken). A TorchScript file holds TorchScript code, not arbitrary Python, and its tensors are not
  read by Python's pickle; it is still code, so use files you trust. Nothing here calls ``torch.load``.
- **Input convention**: images in [0, 1] are rounded to 8-bit levels (as a saved PNG would be; real
  and generated alike), grey images repeated to 3 channels, resized to 299x299 by
  ``torch.nn.functional.interpolate`` (bilinear, antialiased when shrinking) and passed as float32
  in [0, 255], shape (B, 3, 299, 299). A network whose ``forward`` takes ``return_features`` (the
  Inception file) is called with ``return_features=True`` (its 2048 pool features); any other is
  called as ``net(x)``. Either must return features (B, F).
- **The Fréchet distance** is torchmetrics' ``FrechetInceptionDistance``, given the features through
  an identity ``feature`` module (moments summed in float64, the reference formula). Of the
  well-kept implementations it is the one that installs beside this torch: torch-fidelity,
  clean-fid and pytorch-fid all require torchvision (a declared dependency, imported by their
  modules), while torchmetrics, given a feature module, imports neither torchvision nor
  torch-fidelity. The features are computed here, not inside the metric, because precision and
  recall (:func:`flowmatch.metrics.prdc`) need the points themselves, and so does the cache.
- **The floor**: the FID of as many real *training* images against the same held-out ones, what a
  model that reproduced its training data would score (FID is biased upwards at small n).
- **The cache**: the features of the held-out reference images and of the training images, in
  ``fid-DATA-KEY.safetensors`` under the cache folder of
  :mod:`flowmatch.image_metrics` (``$FLOWMATCH_CACHE``, default ``~/.cache/flowmatch``). KEY hashes
  the weights file's bytes, the preprocessing settings and the images themselves, so another
  weights file, data set, ``--n`` or ``--seed`` computes its own, and a changed data folder is never
  served stale features.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import SettingError, first_sentence
from .files import load_script
from .seeding import generator

SIZE = 299
#: the preprocessing; part of the cache key, so a change here recomputes the reference features
PREPROCESS = {"size": SIZE, "levels": 255, "resize": "bilinear-antialias", "scale": 255, "version": 1}
OPTION = "fid_weights"  # the setting (the command line: its option) these errors name


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1], C = 1 or 3 -> float32 (B, 3, 299, 299) in [0, 255]."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise SettingError(OPTION, f"FID takes grey (1 channel) or RGB (3 channels) images (B, C, H, W), got {tuple(x.shape)}")
    x = (x.float().clamp(0, 1) * 255).round()  # 8-bit levels, as saved images hold
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.shape[-2:] != (SIZE, SIZE):
        shrink = x.shape[-2] > SIZE or x.shape[-1] > SIZE
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=shrink)
    return x.clamp(0, 255).contiguous()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_available() -> None:
    """torchmetrics (the ``fid`` extra) is there, or a clear error."""
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise SettingError(OPTION, "FID needs torchmetrics: pip install -e \".[fid]\" (or pip install torchmetrics)") from None


class FeatureNet:
    """A TorchScript feature network read from ``path``: :meth:`features` maps images in [0, 1]
    to (N, F). Loading checks it once on a batch of two blank images, so a file that is not
    TorchScript, or a network that does not return (B, F), fails before anything is sampled."""

    def __init__(self, path, device="cpu", batch_size: int = 50):
        check_available()
        self.path, self.device, self.batch_size = Path(path), torch.device(device), batch_size
        self.net = load_script(self.path, OPTION, "a TorchScript feature network (torch.jit.save), e.g. "
                               "inception-2015-12-05.pt", map_location=self.device)
        self.sha256 = _sha256(self.path)
        names = [a.name for a in self.net.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in names else {}
        self.num_features = self._run(torch.zeros(2, 3, SIZE, SIZE, device=self.device)).shape[1]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The network on preprocessed images (B, 3, 299, 299), checked to return (B, F)."""
        try:
            with torch.inference_mode():
                out = self.net(x, **self.kwargs)
        except Exception as e:  # noqa: BLE001 - the user's network failed on the documented input
            raise SettingError(OPTION, f"{self.path}: the network failed on images (B, 3, {SIZE}, {SIZE}) in [0, 255]: "
                            f"{first_sentence(e)}") from None
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        if not (isinstance(out, torch.Tensor) and out.dim() == 2 and len(out) == len(x) and out.shape[1] > 0
                and out.is_floating_point()):
            raise SettingError(OPTION, f"{self.path}: expected the network to map images ({len(x)}, 3, {SIZE}, {SIZE}) "
                            f"to features ({len(x)}, F), got {got}")
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, F) on the CPU, as the network returns them, of images ``x`` (N, C, H, W) in [0, 1]."""
        out = [self._run(preprocess(x[i:i + self.batch_size].to(self.device))).cpu()
               for i in range(0, len(x), self.batch_size)]
        f = torch.cat(out)
        if not torch.isfinite(f).all():
            raise SettingError(OPTION, f"{self.path}: the network returned non-finite features (NaN or Inf)")
        return f


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between feature sets (N, F) and (M, F): ``|m_r - m_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``
    with the sample means and (unbiased) covariances; torchmetrics' implementation."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):  # the features are already computed (see the module's docstring)
        num_features = real.shape[1]

        def forward(self, f):
            return f

    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def _cache_path(name: str, key: str) -> Path:
    from .image_metrics import _cache_dir

    return _cache_dir() / f"fid-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{key[:16]}.safetensors"


def reference_images(dataset, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` different held-out real images and as many different training images,
    (m, C, H, W) in [0, 1]; at least 6 (precision and recall use 5 nearest neighbours)."""
    if len(dataset.shape) != 3:
        dataset.reference(n, torch.Generator())  # no image set to compare with: the dataset says why
        raise SettingError(OPTION, "FID is measured on image runs")
    g = generator(seed, "fid", 0)
    real = dataset.distinct_rows("held-out", n, g).float()
    train = dataset.distinct_rows("train", len(real), g).float()
    if len(real) < 6:
        raise SettingError(OPTION, f"FID needs at least 6 held-out real images; {dataset.path or dataset.name} holds out "
                        f"{len(real)} (more images, or a larger `holdout` share when training)")
    return real, train


def reference_features(net: FeatureNet, dataset, n: int, seed: int = 0, name: str = "images") -> tuple[dict, Path, bool]:
    """The features of :func:`reference_images` (``real``: held-out, ``train``: training): read
    from the cache when there, else computed and cached. Returns (tensors, cache file, whether it was read from the cache)."""
    from .files import save_weights

    real, train = reference_images(dataset, n, seed)
    h = hashlib.sha256(json.dumps({"weights": net.sha256, "preprocess": PREPROCESS}, sort_keys=True).encode())
    h.update(real.numpy().tobytes())
    h.update(train.numpy().tobytes())
    path = _cache_path(name, h.hexdigest())
    if path.exists():
        from safetensors.torch import load_file

        try:
            cached = load_file(str(path))
            if cached["real"].shape == (len(real), net.num_features):
                return cached, path, True
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            pass
    feats = {"real": net.features(real), "train": net.features(train)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, feats, metadata={"weights": str(net.path), "weights_sha256": net.sha256, "n": n,
                                        "preprocess": json.dumps(PREPROCESS)})
    return feats, path, False


def fid_scores(x: torch.Tensor, dataset, net: FeatureNet, seed: int = 0, name: str = "images") -> dict:
    """FID of samples ``x`` (N, C, H, W) in [0, 1] against up to N different held-out real images
    in ``net``'s features, its floor (as many training images against the same held-out ones), and
    precision, recall, density and coverage beside those of the training images."""
    from .metrics import prdc

    ref, path, cached = reference_features(net, dataset, len(x), seed, name)
    gen = net.features(x.detach().cpu())
    real, train = ref["real"].double(), ref["train"].double()
    fid, floor = frechet_distance(real, gen), frechet_distance(real, train)
    pr_gen, pr_data = prdc(real, gen), prdc(real, train)
    return {"fid": fid, "floor": floor, "ratio": fid / floor if floor > 0 else None, "n": len(x),
            "n_real": len(real), "features": net.num_features, "weights": str(net.path), "weights_sha256": net.sha256,
            "prdc": {k: {"value": pr_gen[k], "data": pr_data[k]} for k in pr_gen},
            "cache": str(path), "cached": cached}


__all__ = ["FeatureNet", "preprocess", "frechet_distance", "reference_images", "reference_features", "fid_scores", "SIZE"]
