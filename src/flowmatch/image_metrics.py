"""Image quality for the embedded digit sets (``digits``, 8x8; ``mnist``, 28x28): Fréchet distance
in a small classifier's features, the same in a PCA of the real digits, and how often
class-conditional samples are recognised.

The feature classifier is a small MLP trained deterministically (fixed seed, full-batch
schedule) on the data set's training split and cached in ``~/.cache/flowmatch`` under a key
made of its settings and the data set's name. The independent judge of class-conditional samples is a logistic
regression on the pixels (scikit-learn), so samples are not graded by the network whose
features they are compared in.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn

from .data.images import EMBEDDED
from .files import save_weights
from .seeding import generator, seed_of

CLASSIFIER = {"hidden": 256, "features": 64, "steps": 600, "lr": 3e-3, "seed": 0, "version": 1}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between two feature sets (N, F)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): symmetric, stable for singular S
    w, u = linalg.eigh(s_a)
    root_a = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    tr_covmean = np.sqrt(np.clip(linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


class DigitClassifier(nn.Module):
    def __init__(self, hidden=256, features=64, pixels=64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, 10)

    def forward(self, x):
        return self.head(self.body(x))

    def features(self, x):
        return self.body(x)


def _cache_dir() -> Path:
    return Path(os.environ.get("FLOWMATCH_CACHE", Path.home() / ".cache" / "flowmatch"))


def _split(data: str, split: str):
    if data not in EMBEDDED:
        raise ValueError(f"image measures are defined for {', '.join(EMBEDDED)}, not {data!r}")
    return EMBEDDED[data](split)


def digit_classifier(data: str = "digits") -> DigitClassifier:
    """The feature network of ``data`` (digits, mnist), trained once per settings and cached
    (safetensors); processes that need it at once wait for the first to train it."""
    from .files import waiting_lock

    settings = CLASSIFIER if data == "digits" else {**CLASSIFIER, "data": data}  # digits: the key it always had
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = _cache_dir() / f"{data}-classifier-{key}.safetensors"
    with waiting_lock(path.with_name(path.name + ".lock")):
        net = _cached_classifier(path, data)
        if net is None:
            net = _train_classifier(data)
            save_weights(path, net.state_dict())
    return net.eval()


def _cached_classifier(path: Path, data: str) -> DigitClassifier | None:
    from safetensors.torch import load_file

    if not path.exists():
        return None
    net = DigitClassifier(CLASSIFIER["hidden"], CLASSIFIER["features"], _split(data, "train")[0][0].numel())
    try:
        net.load_state_dict(load_file(path))
        return net
    except Exception:  # noqa: BLE001 - a damaged cache entry is trained again
        path.unlink()
        return None


def _train_classifier(data: str) -> DigitClassifier:
    x, y = _split(data, "train")
    # trained with gradients even when called from inference code (train --eval-every measures
    # under torch.inference_mode): the first measurement of a fresh cache trains it there
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(CLASSIFIER["seed"])
        x, y = x.clone(), y.clone()  # the loaded split may hold inference tensors, which autograd cannot save
        net = DigitClassifier(CLASSIFIER["hidden"], CLASSIFIER["features"], x[0].numel())
        opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER["lr"])
        for _ in range(CLASSIFIER["steps"]):  # full batch: no sampling, deterministic
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


@functools.lru_cache(maxsize=2)
def pixel_judge(data: str = "digits"):
    """An independent classifier: logistic regression on the pixels of the training split."""
    from sklearn.linear_model import LogisticRegression

    x, y = _split(data, "train")
    return LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1).numpy(), y.numpy())


def _prdc_with_floor(feats: dict) -> dict:
    """Precision/recall/density/coverage in the classifier's features: generated against the
    held-out digits, and the training digits against them (the floor a perfect model meets)."""
    from .metrics import prdc

    test = torch.from_numpy(feats["test"])
    gen, real = prdc(test, torch.from_numpy(feats["gen"])), prdc(test, torch.from_numpy(feats["train"]))
    return {key: {"value": gen[key], "data": real[key]} for key in gen}


def run_data_name(run) -> str | None:
    """The embedded digit set a run (or its teacher's data, for reflowed runs) models, if any."""
    spec = run.doc["data"]
    while spec.get("name") == "pairs":
        spec = spec.get("base") or {}
    return spec.get("name") if spec.get("name") in EMBEDDED else None


def image_scores(x: torch.Tensor, data: str = "digits", seed: int = 0, floor_draws: int = 5) -> dict:
    """FD and PCA-FD of samples ``x`` (N, C, H, W) in [0, 1] against the held-out images of
    ``data``, with the real-against-real floors, and precision/recall/density/coverage in the
    classifier's features.

    The floor is the FD of as many training images against the held-out ones, averaged over
    ``floor_draws`` draws of those training images: at 1000 images a single draw's FD varies by
    about 16% (coefficient of variation, mnist), which a ratio would inherit twice over."""
    from sklearn.decomposition import PCA

    net = digit_classifier(data)
    train_x, _ = _split(data, "train")
    test_x, test_y = _split(data, "test")
    n = len(x)
    g = generator(seed, "floor", 0)
    refs = [train_x[torch.randperm(len(train_x), generator=g)[: min(n, len(train_x))]] for _ in range(floor_draws)]
    x = x.detach().float().cpu().clamp(0, 1)
    pca = PCA(n_components=20, random_state=0).fit(train_x.reshape(len(train_x), -1).numpy())
    with torch.no_grad():
        spaces = {"classifier": lambda v: net.features(v).numpy(), "pca": lambda v: pca.transform(v.reshape(len(v), -1).numpy())}
        res = {"n": n, "data": data}
        for name, f in spaces.items():
            gen, test = f(x), f(test_x)
            floors = [frechet_distance(f(r), test) for r in refs]
            fd, floor = frechet_distance(gen, test), float(np.mean(floors))
            res[name] = {"fd": fd, "floor": floor, "ratio": fd / floor, "floor_sd": float(np.std(floors))}
        res["prdc"] = _prdc_with_floor({"gen": net.features(x).numpy(), "test": net.features(test_x).numpy(),
                                        "train": net.features(refs[0]).numpy()})
        res["classifier_accuracy_on_test"] = float((net(test_x).argmax(1) == test_y).float().mean())
    return res


def label_accuracy(x: torch.Tensor, labels, data: str = "digits") -> float:
    """How often the independent pixel judge recognises samples ``x`` in [0, 1] as ``labels``."""
    pred = pixel_judge(data).predict(x.detach().float().cpu().clamp(0, 1).reshape(len(x), -1).numpy())
    return float((pred == np.asarray(labels)).mean())


def class_samples(run, per_class: int, nfe: int = 100, solver: str = "euler", seed: int = 0,
                  guidance: float = 1.0) -> tuple[torch.Tensor, np.ndarray]:
    """``per_class`` samples of each of a run's classes at ``guidance`` (class ``c`` from seed
    ``seed``'s classes stream, ``c``), in class order, and their labels."""
    xs = [run.sample(per_class, nfe=nfe, solver=solver, seed=seed_of(seed, "classes", c), label=c, guidance=guidance)
          for c in range(run.num_classes)]
    return torch.cat(xs), np.repeat(np.arange(run.num_classes), per_class)


def evaluate_digits(run, n: int = 1000, nfe: int = 100, solver: str = "euler", seed: int = 0, guidance: float = 2.0,
                    per_class: int | None = None, x: torch.Tensor | None = None) -> dict:
    """:func:`image_scores` of ``n`` unconditional samples of a digits or mnist run (``x``: those
    samples, already drawn with these settings, so that FID measures the same ones), and the
    judge's accuracy on class-conditional samples when the run has labels."""
    data = run_data_name(run) or "digits"
    x = run.sample(n, nfe=nfe, solver=solver, seed=seed) if x is None else x
    res = {**image_scores(x, data, seed), "nfe": nfe, "solver": solver}
    test_x, test_y = _split(data, "test")
    if run.num_classes:
        per_class = per_class or max(1, n // run.num_classes)  # as many class-conditional samples as unconditional ones
        judge = pixel_judge(data)
        acc = label_accuracy(*class_samples(run, per_class, nfe, solver, seed, guidance), data)
        res["conditional"] = {"guidance": guidance, "per_class": per_class, "accuracy": acc,
                              "judge": "logistic regression on pixels",
                              "judge_accuracy_on_test": float(judge.score(test_x.reshape(len(test_x), -1).numpy(), test_y.numpy()))}
    return res
