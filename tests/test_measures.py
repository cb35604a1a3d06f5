"""The blur-sensitive measures, checked on cases whose answer is known: identical sets, a set
shifted off the support, a blurred set; the toys' true densities integrate to 1 and match
the frequencies of their own samples."""

import math

import pytest
import torch

from flowmatch.data.toy2d import TOY2D, in_checkerboard, log_density, on_support
from flowmatch.metrics import c2st, off_support, prdc, sharpness, w2

BLURRED = ("moons", "8gaussians", "spirals", "rings")


def _draw(name, n, seed):
    return TOY2D[name](n, torch.Generator().manual_seed(seed))


def _grid(lo=-6.0, hi=6.0, m=241):
    xs = torch.linspace(lo, hi, m, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    return torch.stack([gx.flatten(), gy.flatten()], 1), ((hi - lo) / (m - 1)) ** 2


@pytest.mark.parametrize("name", BLURRED)
def test_true_density_integrates_to_one(name):
    pts, cell = _grid()
    assert log_density(name, pts).exp().sum().item() * cell == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("name", [*BLURRED, "checkerboard"])
def test_true_density_matches_the_samples_frequencies(name):
    """The probability of each 1x1 box under the density equals the share of 40000 samples in
    it (to a few binomial standard errors)."""
    x = _draw(name, 40_000, 0).double()
    pts, cell = _grid(-5.0, 5.0, 201)
    p = log_density(name, pts).exp() * cell
    box = lambda z: (torch.floor(z[:, 0]) + 5) * 10 + (torch.floor(z[:, 1]) + 5)  # noqa: E731
    inside = (pts.abs() < 5).all(1)
    mass = torch.zeros(100, dtype=torch.float64).index_add_(0, box(pts[inside]).long(), p[inside])
    keep = (x.abs() < 5).all(1)
    freq = torch.bincount(box(x[keep]).long(), minlength=100).double() / len(x)
    se = (mass * (1 - mass) / len(x)).sqrt()
    assert ((freq - mass).abs() <= 5 * se + 3e-3).all(), (freq - mass).abs().max()


def test_checkerboard_cells():
    pts = torch.tensor([[-3.0, -1.0], [-1.0, -3.0], [-3.0, -3.0], [1.0, 1.0], [3.0, 1.0], [4.5, 1.0]])
    assert in_checkerboard(pts).tolist() == [True, True, False, False, True, False]
    assert math.isinf(log_density("checkerboard", pts)[2].item())
    assert log_density("checkerboard", pts)[0].item() == pytest.approx(-math.log(32))


def test_data_is_on_its_support():
    assert off_support("checkerboard", _draw("checkerboard", 20_000, 1)) == 0.0
    for name in BLURRED:  # within 3 sigma of the curve: at most the 2-D tail exp(-4.5) ~ 1.1%
        assert off_support(name, _draw(name, 20_000, 1)) <= 0.013


def test_shifted_checkerboard_is_off_its_support():
    """One cell to the right, every point lands on a cell of the other colour or off the board."""
    x = _draw("checkerboard", 4000, 2) + torch.tensor([2.0, 0.0])
    assert off_support("checkerboard", x) == 1.0
    assert not on_support("checkerboard", x).any()


def test_blur_is_seen_by_the_new_measures_and_hardly_by_w2():
    """Blurring the checkerboard by noise of std 0.15 puts a known share of points off its cells
    (here computed by Monte Carlo on 200000 points) and moves precision and the classifier test;
    W2 between 4000 points moves by less than its own sampling noise."""
    g = torch.Generator().manual_seed(3)
    ref, data = _draw("checkerboard", 4000, 4), _draw("checkerboard", 4000, 5)
    blurred = data + 0.15 * torch.randn(data.shape, generator=g)
    big = _draw("checkerboard", 200_000, 6)
    expected = off_support("checkerboard", big + 0.15 * torch.randn(big.shape, generator=g))
    assert off_support("checkerboard", blurred) == pytest.approx(expected, abs=0.015)
    assert expected > 0.1

    same, blur = sharpness(data, ref, "checkerboard"), sharpness(blurred, ref, "checkerboard")
    assert same["off_support"] == 0.0 and blur["off_support"] > 0.1
    assert blur["precision"] < same["precision"] - 0.02
    assert w2(blurred, ref) < 1.1 * w2(data, ref)  # what W2 at this size sees of the same blur


def test_c2st_sees_a_strong_blur():
    ref, data = _draw("checkerboard", 4000, 4), _draw("checkerboard", 4000, 5)
    blurred = data + 0.4 * torch.randn(data.shape, generator=torch.Generator().manual_seed(3))
    same = c2st(ref, data)
    assert abs(same - 0.5) < 0.03
    assert c2st(ref, blurred) > same + 0.05


def test_prdc_on_identical_and_disjoint_sets():
    x = _draw("moons", 1000, 7)
    same = prdc(x, x)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = prdc(x, x + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_c2st_on_equal_and_shifted_distributions():
    a, b = _draw("8gaussians", 2000, 8), _draw("8gaussians", 2000, 9)
    assert abs(c2st(a, b) - 0.5) < 0.04
    assert c2st(a, b + torch.tensor([0.0, 1.0])) > 0.9


def test_digit_frechet_distance_sees_blurred_digits():
    """1000 real training digits blurred by half a pixel sit far above the Fréchet floor (the
    same digits unblurred), and lose recall in the classifier's features."""
    from scipy.ndimage import gaussian_filter

    from flowmatch.data.images import load_digits_split
    from flowmatch.image_metrics import digit_classifier, frechet_distance

    net = digit_classifier()
    train, _ = load_digits_split("train")
    test, _ = load_digits_split("test")
    real = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(11))[:1000]]
    blurred = torch.from_numpy(gaussian_filter(real.numpy(), sigma=(0, 0, 0.5, 0.5)))
    with torch.no_grad():
        f_test, f_real, f_blur = (net.features(x) for x in (test, real, blurred))
    floor = frechet_distance(f_real.numpy(), f_test.numpy())
    assert frechet_distance(f_blur.numpy(), f_test.numpy()) > 5 * floor
    assert prdc(f_test, f_blur)["recall"] < prdc(f_test, f_real)["recall"] - 0.1


def test_evaluate_without_straightness_measures_the_same(tiny_run):
    """``straight=False`` leaves out the straightness (and its table line), nothing else."""
    from flowmatch.metrics import evaluate, format_table, straightness
    from flowmatch.runs import load_run
    from flowmatch.seeding import noise

    run = load_run(tiny_run)
    full = evaluate(run, (2,), n=300, seed=3, adaptive=None)
    part = evaluate(run, (2,), n=300, seed=3, adaptive=None, straight=False)
    assert "straightness" not in part and "straightness" not in format_table(part)
    assert part == {k: v for k, v in full.items() if k != "straightness"}
    # the teacher's straightness as the reflow quality test computes it beside evaluate
    assert straightness(run.velocity, noise(3, 0, 300, run.shape, run.device), nfe=100) == full["straightness"]


def test_the_data_floor_is_solved_once_and_only_for_the_same_draws(monkeypatch):
    """``data_w2`` remembers w2 between two data draws by their contents: the same draws give the
    same value without a second OT solve; other draws (or the pair reversed in shape) are solved."""
    from flowmatch import metrics

    calls = []
    monkeypatch.setattr(metrics, "_FLOORS", {})
    monkeypatch.setattr(metrics, "w2", lambda a, b: calls.append(1) or w2(a, b))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g)
    first = metrics.data_w2(a, b)
    assert first == w2(a, b) and len(calls) == 1
    assert metrics.data_w2(a.clone(), b.clone()) == first and len(calls) == 1  # the same contents: remembered
    c = b.clone()
    c[0, 0] += 1e-6  # one coordinate differs: solved anew
    assert metrics.data_w2(a, c) != first and len(calls) == 2
    assert metrics.data_w2(a.reshape(150, 4), b.reshape(150, 4)) != first and len(calls) == 3


def test_memorisation_on_copies_fresh_draws_blurred_copies_and_a_shift():
    """The memorisation measure on cases whose answer is known: samples that copy training rows sit
    nearer them (share 1, distance ratio 0); fresh draws of the same Gaussian are as near the
    training rows as the held-out ones (share 0.5 within Binomial(2000, 1/2)'s 4 sd, ratio about 1);
    training rows blurred by a tenth of their nearest-neighbour spacing still sit nearer their
    originals; a shifted set is far from both, and no nearer either (by the distance ratio)."""
    from flowmatch.metrics import memorisation

    g = torch.Generator().manual_seed(0)
    train, held, fresh = (torch.randn(n, 3, generator=g) for n in (500, 500, 2000))
    copies = train[torch.randint(500, (2000,), generator=g)]
    m = memorisation(copies, train, held)
    assert m["train_nearer"] == 1.0 and m["distance_ratio"] == 0.0 and m["rows"] == 500
    m = memorisation(fresh, train, held)
    assert abs(m["train_nearer"] - 0.5) < 4 * math.sqrt(0.25 / 2000) and 0.85 < m["distance_ratio"] < 1.15
    spacing = torch.cdist(train, train).fill_diagonal_(float("inf")).amin(1).median()
    blurred = copies + 0.1 * spacing * torch.randn(copies.shape, generator=g)
    assert memorisation(blurred, train, held)["train_nearer"] > 0.9
    # far off the data, every sample's nearest row is the same extreme row of one set or the other:
    # the share says nothing there, the distance ratio (about 1) says that nothing is copied
    assert 0.9 < memorisation(fresh + 10.0, train, held)["distance_ratio"] < 1.1
    with pytest.raises(ValueError, match="as many rows"):
        memorisation(fresh, train, held[:10])


def test_eval_reports_memorisation_for_tables_and_not_for_the_toys(cli, tiny_run, tmp_path):
    """A table holds out rows: eval's rows carry the share of samples nearer a training row than a
    held-out one, computed on the samples eval draws (the library's measure of the same sets)."""
    import json

    import numpy as np

    from flowmatch.metrics import data_w2, finite_rows, memorisation
    from flowmatch.runs import load_run

    from helpers import TINY

    np.save(tmp_path / "t.npy", np.random.default_rng(0).normal(size=(400, 2)))
    rc, _, err = cli("train", "--data", tmp_path / "t.npy", "--steps", "30", "--out", tmp_path / "run", "--no-plots", *TINY)
    assert rc == 0, err
    rc, out, err = cli("eval", tmp_path / "run", "--nfe", "4", "--n", "300", "--repeats", "1", "--tol", "1e-2", "--json")
    assert rc == 0, err
    row = json.loads(out)["nfe"]["4"]
    r = load_run(tmp_path / "run")
    g = torch.Generator().manual_seed(0)
    held = r.dataset.distinct_rows("held-out", 300, g)
    x = r.sample(40, nfe=4, seed=0)  # as many samples as held-out rows
    expected = memorisation(x, r.dataset.distinct_rows("train", len(held), g), held)
    assert len(held) == 40 and json.loads(out)["n"] == 40 and row["train_nearer"] == expected["train_nearer"]
    # the other measures against the 40 different held-out rows, each once (drawn with replacement, repeated
    # rows had k-NN balls of radius 0: precision 0 and C2ST 1 for any model)
    ref, train = finite_rows(r.dataset, 300)
    assert len(torch.unique(ref, dim=0)) == len(ref) == 40
    assert row["precision"] == sharpness(x, ref)["precision"] > 0.5 and row["c2st"] == sharpness(x, ref)["c2st"]
    assert row["floor"] == pytest.approx(data_w2(ref, train))
    rc, out, err = cli("eval", tiny_run, "--nfe", "1", "--n", "200", "--repeats", "1", "--tol", "1e-2", "--json")
    assert rc == 0, err
    assert "train_nearer" not in json.loads(out)["nfe"]["1"]  # the checkerboard draws fresh points: nothing to memorise
