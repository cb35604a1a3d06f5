"""Image quality for digits: Fréchet distance in a small classifier's features, the same in
a PCA of the real digits, and how often class-conditional samples are recognised.

The feature classifier is a small MLP trained deterministically (fixed seed, full-batch
schedule) on the digits' training split and cached in ``~/.cache/flowmatch`` under a key
made of its settings. The independent judge of class-conditional samples is a logistic
regression on the pixels (scikit-learn), so samples are not graded by the network whose
features they are compared in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn

from .data.images import load_digits_split

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
    def __init__(self, hidden=256, features=64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, 10)

    def forward(self, x):
        return self.head(self.body(x))

    def features(self, x):
        return self.body(x)


def _cache_dir() -> Path:
    return Path(os.environ.get("FLOWMATCH_CACHE", Path.home() / ".cache" / "flowmatch"))


def digit_classifier() -> DigitClassifier:
    """The feature network, trained once per settings and cached (safetensors)."""
    from safetensors.torch import load_file

    from .runs import save_weights

    key = hashlib.sha256(json.dumps(CLASSIFIER, sort_keys=True).encode()).hexdigest()[:12]
    path = _cache_dir() / f"digits-classifier-{key}.safetensors"
    net = DigitClassifier(CLASSIFIER["hidden"], CLASSIFIER["features"])
    if path.exists():
        try:
            net.load_state_dict(load_file(path))
            return net.eval()
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            path.unlink()
    x, y = load_digits_split("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CLASSIFIER["seed"])
        net = DigitClassifier(CLASSIFIER["hidden"], CLASSIFIER["features"])
        opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER["lr"])
        for _ in range(CLASSIFIER["steps"]):  # full batch: no sampling, deterministic
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, net.state_dict())
    return net.eval()


def pixel_judge():
    """An independent classifier: logistic regression on the pixels of the training split."""
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits_split("train")
    return LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1).numpy(), y.numpy())


def _prdc_with_floor(feats: dict) -> dict:
    """Precision/recall/density/coverage in the classifier's features: generated against the
    held-out digits, and the training digits against them (the floor a perfect model meets)."""
    from .metrics import prdc

    test = torch.from_numpy(feats["test"])
    gen, real = prdc(test, torch.from_numpy(feats["gen"])), prdc(test, torch.from_numpy(feats["train"]))
    return {key: {"value": gen[key], "data": real[key]} for key in gen}


def evaluate_digits(run, n: int = 1000, nfe: int = 100, solver: str = "euler", seed: int = 0, guidance: float = 2.0,
                    per_class: int = 100) -> dict:
    """FD and PCA-FD of ``n`` unconditional samples against the held-out digits, with the
    real-against-real floors (training digits against held-out digits, same count), and the
    judge's accuracy on class-conditional samples when the run has labels."""
    from sklearn.decomposition import PCA

    net = digit_classifier()
    train_x, _ = load_digits_split("train")
    test_x, test_y = load_digits_split("test")
    g = torch.Generator().manual_seed(seed + 11)
    real_ref = train_x[torch.randperm(len(train_x), generator=g)[: min(n, len(train_x))]]
    x = run.sample(n, nfe=nfe, solver=solver, seed=seed).clamp(0, 1)

    with torch.no_grad():
        feats = {k: net.features(v).numpy() for k, v in {"gen": x, "test": test_x, "train": real_ref}.items()}
    pca = PCA(n_components=20, random_state=0).fit(train_x.reshape(len(train_x), -1).numpy())
    proj = {k: pca.transform(v.reshape(len(v), -1).numpy()) for k, v in {"gen": x, "test": test_x, "train": real_ref}.items()}
    res = {"n": n, "nfe": nfe, "solver": solver}
    for name, space in (("classifier", feats), ("pca", proj)):
        fd, floor = frechet_distance(space["gen"], space["test"]), frechet_distance(space["train"], space["test"])
        res[name] = {"fd": fd, "floor": floor, "ratio": fd / floor}
    res["prdc"] = _prdc_with_floor(feats)
    with torch.no_grad():
        res["classifier_accuracy_on_test"] = float((net(test_x).argmax(1) == test_y).float().mean())
    if run.num_classes:
        judge = pixel_judge()
        labels, preds = [], []
        for c in range(run.num_classes):
            xc = run.sample(per_class, nfe=nfe, solver=solver, seed=seed + 100 + c, label=c, guidance=guidance)
            preds.append(judge.predict(xc.clamp(0, 1).reshape(len(xc), -1).numpy()))
            labels.append(np.full(per_class, c))
        acc = float((np.concatenate(preds) == np.concatenate(labels)).mean())
        res["conditional"] = {"guidance": guidance, "per_class": per_class, "accuracy": acc,
                              "judge": "logistic regression on pixels",
                              "judge_accuracy_on_test": float(judge.score(test_x.reshape(len(test_x), -1).numpy(), test_y.numpy()))}
    return res
