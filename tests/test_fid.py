"""FID with the user's weights (`eval --fid-weights`): the Fréchet distance against Gaussians whose
answer is known in closed form, the preprocessing on generated image shapes, the command end to
end with a small random TorchScript network (cache written, then reused), and bad input."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowmatch.fid import SIZE, FeatureNet, fid_scores, frechet_distance, preprocess, reference_images

from helpers import one_line_error


def with_moments(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` points whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # sample covariance exactly I
    return mean + z @ torch.linalg.cholesky(cov).T


def commuting(d: int, seed: int):
    """Two covariances sharing eigenvectors ``U`` (eigenvalues ``a``, ``b``), and two means."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a, b = 0.2 + 3 * torch.rand(d, generator=g, dtype=torch.float64), 0.2 + 3 * torch.rand(d, generator=g, dtype=torch.float64)
    m1, m2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    # FID = |m1 - m2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), and with S1 S2 = U diag(a b) U^T the trace is
    # sum (sqrt a - sqrt b)^2
    exact = float(((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    return m1, (u * a) @ u.T, m2, (u * b) @ u.T, exact


@pytest.mark.parametrize("d,seed", [(1, 0), (3, 1), (8, 2), (32, 3)])
def test_frechet_distance_on_exact_moments_is_the_closed_form(d, seed):
    m1, s1, m2, s2, exact = commuting(d, seed)
    x, y = with_moments(m1, s1, 200, seed), with_moments(m2, s2, 300, seed + 100)
    assert frechet_distance(x, y) == pytest.approx(exact, abs=1e-6)
    assert frechet_distance(y, x) == pytest.approx(exact, abs=1e-6)  # symmetric
    assert abs(frechet_distance(x, x)) < 1e-6


def test_frechet_distance_agrees_with_the_symmetric_form_when_covariances_do_not_commute():
    """torchmetrics takes eigenvalues of S1 S2; image_metrics' own function the symmetric
    S1^(1/2) S2 S1^(1/2): two ways to the same trace."""
    from flowmatch.image_metrics import frechet_distance as symmetric

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    x = with_moments(torch.zeros(6, dtype=torch.float64), a @ a.T + 0.1 * torch.eye(6), 100, 0)
    y = with_moments(torch.ones(6, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(6), 100, 1)
    assert frechet_distance(x, y) == pytest.approx(symmetric(x.numpy(), y.numpy()), abs=1e-6)


def test_frechet_distance_of_large_gaussian_samples_nears_the_closed_form():
    m1, s1, m2, s2, exact = commuting(4, 7)
    g = torch.Generator().manual_seed(8)
    x = m1 + torch.randn(20000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = m2 + torch.randn(20000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    # the sampling error is mostly the mean term's: |m1 - m2|^2 has standard error about
    # 2 sqrt(dm' (S1 + S2) dm / n) = 0.11 here (20 seeds: 0.13 around a bias of -0.02; exact = 16.56)
    dm = m1 - m2
    se = 2 * math.sqrt(dm @ (s1 + s2) @ dm / len(x))
    assert frechet_distance(x, y) == pytest.approx(exact, abs=4 * se + 0.05)


@given(b=st.integers(1, 3), c=st.sampled_from([1, 3]), h=st.integers(1, 40), w=st.integers(1, 40),
       value=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_preprocessing_gives_rgb_299_in_0_255(b, c, h, w, value, seed):
    x = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))
    y = preprocess(x)
    assert y.shape == (b, 3, SIZE, SIZE) and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 255
    if c == 1:  # grey repeated to three equal channels
        assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])
    flat = preprocess(torch.full((b, c, h, w), value))  # a flat image stays flat, at its 8-bit level
    torch.testing.assert_close(flat, torch.full_like(flat, round(value * 255)), atol=1e-3, rtol=0)


def small_net(features: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, features, 13, stride=13), torch.nn.Tanh(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small randomly initialised conv net, (B, 3, 299, 299) -> (B, 16), as a TorchScript file."""
    path = tmp_path_factory.mktemp("fid") / "net.pt"
    torch.jit.save(torch.jit.trace(small_net().eval(), torch.zeros(1, 3, SIZE, SIZE)), str(path))
    return path


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny run on 200 RGB 8x8 images (a .npy array; 20 held out): 4 steps of a small MLP."""
    from flowmatch.cli import run

    root = tmp_path_factory.mktemp("fidrun")
    rng = np.random.default_rng(0)
    base = rng.random((2, 3, 8, 8))
    x = np.clip(base[rng.integers(0, 2, 200)] + 0.1 * rng.normal(size=(200, 3, 8, 8)), 0, 1).astype(np.float32)
    np.save(root / "x.npy", x)
    rc = run(["train", "--data", str(root / "x.npy"), "--model", "mlp", "--width", "32", "--depth", "2", "--steps", "4",
              "--batch-size", "16", "--checkpoint-every", "4", "--no-plots", "--no-progress", "--out", str(root / "run")])
    assert rc == 0
    return root / "run"


def test_eval_fid_end_to_end_then_from_the_cache(cli, weights, image_run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLOWMATCH_CACHE", str(cache))
    calls = []
    features = FeatureNet.features
    monkeypatch.setattr(FeatureNet, "features", lambda self, x: calls.append(len(x)) or features(self, x))

    rc, out, err = cli("eval", image_run, "--fid-weights", weights, "--n", "64", "--nfe", "2", "--json")
    assert rc == 0, err
    res = json.loads(out)
    fid = res["fid"]
    assert res["n"] == 64 and res["nfe"] == 2 and fid["features"] == 16 and fid["n"] == 64 and fid["n_real"] == 20
    assert set(fid["prdc"]) == {"precision", "recall", "density", "coverage"}
    assert not fid["cached"] and calls == [20, 20, 64]  # all 20 held-out images, as many training ones, the samples
    files = list(cache.glob("fid-*.safetensors"))
    assert [str(p) for p in files] == [fid["cache"]] and "x.npy" in files[0].name
    # the numbers by their definitions, on the run's samples (eval's draw: --nfe 2, seed 0) in the
    # network's features: the Frechet distance by image_metrics' symmetric form, and precision
    # (recall) as the share of samples (held-out images) in the other set's 5th-neighbour balls
    from safetensors.torch import load_file

    from flowmatch.image_metrics import frechet_distance as symmetric
    from flowmatch.runs import load_run

    real = load_file(files[0])["real"].double()
    gen = features(FeatureNet(weights), load_run(image_run).sample(64, nfe=2, seed=0)).double()
    assert fid["fid"] == pytest.approx(symmetric(real.numpy(), gen.numpy()), rel=1e-6, abs=1e-9)

    def inside(points, centres):
        radius = torch.cdist(centres, centres).kthvalue(6, dim=1).values
        return (torch.cdist(points, centres) < radius[None]).any(1).double().mean().item()

    assert fid["prdc"]["precision"]["value"] == pytest.approx(inside(gen, real), abs=1e-12)
    assert fid["prdc"]["recall"]["value"] == pytest.approx(inside(real, gen), abs=1e-12)
    stamp = files[0].stat().st_mtime_ns

    calls.clear()  # the second eval reads the reference features: only the samples go through the network
    rc, out, err = cli("eval", image_run, "--fid-weights", weights, "--n", "64", "--nfe", "2", "--json")
    assert rc == 0, err
    again = json.loads(out)["fid"]
    assert again["cached"] and calls == [64] and files[0].stat().st_mtime_ns == stamp
    assert again["fid"] == fid["fid"] and again["floor"] == fid["floor"]

    rc, out, err = cli("eval", image_run, "--fid-weights", weights, "--n", "64", "--nfe", "2")
    assert rc == 0 and out == "" and "FID" in err and "precision" in err and "net.pt" in err


def test_fid_of_the_reference_itself_is_zero_and_the_cache_holds_its_features(weights, image_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from flowmatch.runs import load_run

    monkeypatch.setenv("FLOWMATCH_CACHE", str(tmp_path / "cache"))
    ds, net = load_run(image_run).dataset, FeatureNet(weights)
    real, train = reference_images(ds, 48, seed=0)
    assert len(real) == len(train) == 20 and len(torch.unique(real.flatten(1), dim=0)) == 20  # all held out, no repeats
    res = fid_scores(real, ds, net, seed=0)
    assert abs(res["fid"]) < 1e-6 and res["prdc"]["precision"]["value"] == 1 and res["prdc"]["recall"]["value"] == 1
    cached = load_file(res["cache"])
    torch.testing.assert_close(cached["real"], net.features(real))
    torch.testing.assert_close(cached["train"], net.features(train))
    assert set(cached) == {"real", "train"}  # nothing stored that is never read


class InceptionLike(torch.nn.Module):
    """The FID Inception file's calling convention: logits by default, features with return_features."""

    def __init__(self):
        super().__init__()
        self.body = small_net(8)
        self.head = torch.nn.Linear(8, 1008)

    def forward(self, x, return_features: bool = False):
        f = self.body(x)
        return f if return_features else self.head(f)


def test_a_network_with_return_features_is_asked_for_its_features(tmp_path):
    torch.jit.save(torch.jit.script(InceptionLike()), str(tmp_path / "inception.pt"))
    net = FeatureNet(tmp_path / "inception.pt")
    assert net.num_features == 8 and net.features(torch.rand(3, 1, 28, 28)).shape == (3, 8)


def test_digit_runs_get_fid_beside_the_classifier_measures(cli, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWMATCH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    rc, _, err = cli("train", "--data", "digits", "--model", "mlp", "--width", "32", "--depth", "2", "--steps", "4",
                     "--batch-size", "16", "--checkpoint-every", "4", "--no-plots", "--no-progress", "--out", run)
    assert rc == 0, err
    rc, out, err = cli("eval", run, "--fid-weights", weights, "--n", "50", "--nfe", "2", "--json")
    assert rc == 0, err
    res = json.loads(out)
    # FID beside the classifier's measures is the library's FID of the same samples (eval's draw)
    from flowmatch.image_metrics import image_scores
    from flowmatch.runs import load_run

    x = load_run(run).sample(50, nfe=2, seed=0)
    assert res["fid"]["n"] == 50 and res["fid"]["fid"] == pytest.approx(
        fid_scores(x, load_run(run).dataset, FeatureNet(weights), name="digits")["fid"], rel=1e-9)
    assert res["classifier"]["fd"] == pytest.approx(image_scores(x, "digits")["classifier"]["fd"], rel=1e-9)
    assert list((tmp_path / "cache").glob("fid-digits-*.safetensors"))


class ImageMap(torch.nn.Module):
    def forward(self, x):
        return x[:, :2]  # (B, 2, H, W): not features


class Pair(torch.nn.Module):
    def forward(self, x):
        f = x.mean((2, 3))
        return f, f


@pytest.mark.parametrize("case", ["missing", "directory", "text", "state-dict", "image-out", "tuple-out", "fails"])
def test_bad_weights_files_are_one_line_naming_the_option(cli, image_run, tmp_path, monkeypatch, case):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLOWMATCH_CACHE", str(cache))
    path = tmp_path / f"{case}.pt"
    if case == "directory":
        path.mkdir()
    elif case == "text":
        path.write_text("not a network")
    elif case == "state-dict":  # what torch.save writes: a pickle, not TorchScript
        torch.save(small_net().state_dict(), path)
    elif case in ("image-out", "tuple-out"):
        torch.jit.save(torch.jit.script(ImageMap() if case == "image-out" else Pair()), str(path))
    elif case == "fails":  # expects 1 channel: the documented input has 3
        torch.jit.save(torch.jit.trace(torch.nn.Conv2d(1, 2, 3), torch.zeros(1, 1, 8, 8)), str(path))
    line = one_line_error(*cli("eval", image_run, "--fid-weights", path, "--n", "16", "--nfe", "2", "--json")[::2])
    assert "--fid-weights" in line and str(path) in line
    expected = {"missing": "no such file", "directory": "no such file", "text": "TorchScript",
                "state-dict": "TorchScript", "image-out": "got shape (2, 2, 299, 299)", "tuple-out": "got tuple", "fails": "failed"}[case]
    assert expected in line
    assert not cache.exists()


def test_fid_weights_on_a_vector_run_and_other_images_without_it(cli, tiny_run, image_run, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWMATCH_CACHE", str(tmp_path / "cache"))
    line = one_line_error(*cli("eval", tiny_run, "--fid-weights", weights, "--json")[::2])
    assert "--fid-weights" in line and "image runs" in line and str(tiny_run) in line
    line = one_line_error(*cli("eval", image_run, "--n", "16", "--nfe", "2")[::2])
    assert "--fid-weights" in line and str(image_run) in line
    assert "--n" in one_line_error(*cli("eval", image_run, "--fid-weights", weights, "--n", "5", "--nfe", "2")[::2])
    assert not (tmp_path / "cache").exists()
