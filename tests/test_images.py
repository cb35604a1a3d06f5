"""Images: digits, image folders, .npy images, the UNet adapter, guidance, image metrics."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.data import make_dataset, spec_from_arg
from flowmatch.data.images import load_digits_split, load_image_folder
from flowmatch.errors import UserError
from flowmatch.image_metrics import frechet_distance
from flowmatch.models import make_model

from helpers import one_line_error

SMALL = ["--steps", "12", "--batch-size", "16", "--no-progress", "--checkpoint-every", "6"]


@pytest.fixture
def folder(tmp_path):
    """Two classes; PNG and JPEG; RGB and grayscale; different sizes; a corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls, color in (("cats", (200, 40, 40)), ("dogs", (40, 40, 200))):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            size = (20 + 4 * i, 16 + 2 * i)
            arr = np.clip(np.array(color) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(arr)
            if i == 3:
                im = im.convert("L")
            im.save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_digits_are_shipped_split_and_scaled():
    x, y = load_digits_split("train")
    xt, yt = load_digits_split("test")
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == set(range(10))
    assert torch.equal(load_digits_split("train")[0], x)  # a fixed split
    ds = make_dataset(spec_from_arg("digits"))
    assert ds.shape == (1, 8, 8) and ds.num_classes == 10
    b = ds.sample(32, torch.Generator().manual_seed(0))
    assert b.x1.min() >= -1 and b.x1.max() <= 1 and b.label.shape == (32,)


def test_image_folder_with_classes(folder):
    x, y, classes = load_image_folder(str(folder), 8)
    assert classes == ["cats", "dogs"] and x.shape == (8, 3, 8, 8) and y.tolist() == [0] * 4 + [1] * 4
    assert 0 <= x.min() and x.max() <= 1
    # red cats, blue dogs survive resizing and cropping (grayscale ones are grey)
    assert x[0, 0].mean() > x[0, 2].mean() and x[4, 2].mean() > x[4, 0].mean()


def test_corrupt_file_is_named_or_skipped(folder):
    bad = folder / "cats" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="broken.png"):
        load_image_folder(str(folder), 8)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, y, _ = load_image_folder(str(folder), 8, skip_bad=True)
    assert len(x) == 8 and any("broken.png" in str(m.message) for m in w)


@pytest.mark.parametrize("case", ["empty", "single", "not-images"])
def test_bad_folders(cli, tmp_path, case):
    root = tmp_path / "bad"
    root.mkdir()
    if case == "single":
        Image.new("RGB", (8, 8)).save(root / "one.png")
    elif case == "not-images":
        (root / "notes.txt").write_text("hello")
    rc, _, err = cli("train", "--data", root, "--out", tmp_path / "run", *SMALL)
    line = one_line_error(rc, err)
    assert str(root) in line
    assert not (tmp_path / "run").exists()


def test_image_npy_must_be_pixels(cli, tmp_path):
    np.save(tmp_path / "x.npy", np.full((4, 1, 8, 8), 3.0))
    line = one_line_error(*cli("train", "--data", tmp_path / "x.npy", "--out", tmp_path / "run", *SMALL)[::2])
    assert "[0, 1]" in line


def test_unet_adapter_shapes_and_labels():
    net = make_model({"name": "unet"}, (1, 8, 8), num_classes=3)
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5)
    out = net(x, t, torch.tensor([0, 1, 2, -1, 0]))
    assert out.shape == x.shape
    # -1 and "no label" both mean the null class
    torch.testing.assert_close(net(x[:1], t[:1], torch.tensor([-1])), net(x[:1], t[:1]))
    assert not torch.allclose(net(x[:1], t[:1], torch.tensor([0])), net(x[:1], t[:1]))


@pytest.mark.parametrize("interval", [False, True])
def test_the_unet_evaluates_a_large_batch_in_chunks_without_changing_a_sample(interval):
    """Without gradients on the CPU the adapter runs cpu_chunk(h, w) samples at a time: every sample's
    value is the one the whole batch gives (per-sample times, labels and steps follow their samples)."""
    from flowmatch.models import unet

    torch.manual_seed(0)
    net = make_model({"name": "unet", "interval": interval}, (1, 8, 8), num_classes=3).eval()
    n = 2 * unet.cpu_chunk(8, 8) + 5
    x, t, label = torch.randn(n, 1, 8, 8), torch.rand(n), torch.randint(-1, 3, (n,))
    h = torch.rand(n) * (1 - t) if interval else None
    whole = net(x, t, label, h).detach()  # gradients on: one pass over the batch
    with torch.no_grad():
        chunked = net(x, t, label, h)
        shared = net(x, torch.tensor(0.3), label, h)  # a time shared by the batch stays whole
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared, net(x, torch.full((n,), 0.3), label, h).detach(), atol=1e-5, rtol=1e-5)


def test_class_conditional_folder_run(cli, folder, tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli("train", "--data", folder, "--image-size", "8", "--out", run, *SMALL)
    assert rc == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["num_classes"] == 2 and cfg["shape"] == [3, 8, 8] and cfg["data"]["classes"] == ["cats", "dogs"]
    assert sorted(p.name for p in (run / "progress").iterdir()) == ["step-0000006.png", "step-0000012.png"]
    assert (run / "samples_by_class.png").exists()
    rc, _, err = cli("sample", run, "--n", "6", "--nfe", "4", "--label", "1", "--guidance", "2", "--out",
                     tmp_path / "x.npy", "--no-progress")
    assert rc == 0, err
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (6, 3, 8, 8) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    rc, _, err = cli("sample", run, "--n", "6", "--nfe", "4", "--out", tmp_path / "grid.png", "--no-progress")
    assert rc == 0 and (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    rc, out, err = cli("sample", run, "--nfe", "2", "--out", tmp_path / "default.png", "--no-progress")
    assert rc == 0 and "wrote 64 samples" in out + err, err  # a picture of images: an 8x8 grid, not 4000 images
    assert "0..1" in one_line_error(*cli("sample", run, "--label", "5", "--out", tmp_path / "y.npy")[::2])
    assert not (tmp_path / "y.npy").exists()


def test_image_pictures_are_drawn_at_the_runs_own_steps(cli, folder, tmp_path, monkeypatch):
    """A one-step image run (MeanFlow) draws its sample grids at its one step, a flow at 100."""
    from flowmatch.plots import plot_image_run
    from flowmatch.runs import Run, load_run

    for objective, nfe in (("meanflow", 1), ("cfm", 100)):
        run = tmp_path / objective
        rc, _, err = cli("train", "--data", folder, "--image-size", "8", "--objective", objective, "--out", run,
                         "--no-plots", "--steps", "2", "--batch-size", "4", "--no-progress")
        assert rc == 0, err
        asked = []
        monkeypatch.setattr(Run, "sample", lambda self, n, nfe, asked=asked, real=Run.sample, **kw:
                            asked.append(nfe) or real(self, n, nfe=2, **kw))
        plot_image_run(load_run(run), run)
        monkeypatch.undo()
        assert asked == [nfe] * 3, (objective, asked)  # the grid and one row per class (two classes)


def test_label_on_an_unconditional_run(cli, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((6, 1, 8, 8)))
    run = tmp_path / "run"
    rc, _, err = cli("train", "--data", tmp_path / "x.npy", "--out", run, "--no-plots", *SMALL)
    assert rc == 0, err
    assert "unconditional" in one_line_error(*cli("sample", run, "--label", "0", "--out", tmp_path / "y.npy")[::2])


def test_frechet_distance_matches_the_gaussian_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(1, 2, (20000, 3))
    # FD(N(0, I), N(1, 4 I)) = 3 * 1 + 3 * (1 + 4 - 2 * 2) = 6
    assert abs(frechet_distance(a, b) - 6.0) < 0.15
    assert abs(frechet_distance(a, a)) < 1e-6


def test_digit_eval_reports_fd_floor_and_accuracy(cli, tmp_path, monkeypatch):
    from flowmatch.data.images import load_digits_split
    from flowmatch.image_metrics import digit_classifier
    from flowmatch.runs import load_run

    monkeypatch.setenv("FLOWMATCH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    # 300 steps of a small class-conditional MLP: enough for its guided samples to be read as their class
    rc, _, err = cli("train", "--data", "digits", "--model", "mlp", "--width", "64", "--depth", "2", "--steps", "300",
                     "--batch-size", "64", "--checkpoint-every", "300", "--out", run, "--no-plots", "--no-progress")
    assert rc == 0, err
    rc, out, err = cli("eval", run, "--n", "200", "--nfe", "4", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["n"] == 200 and res["nfe"] == 4  # the options given, not defaults
    assert res["classifier_accuracy_on_test"] > 0.9  # the feature network is a real digit classifier
    # guided samples (weight 2; as many as --n, here 20 per class) recognised as the class asked for:
    # measured 0.957-0.972 over seeds 0-2 at 100 per class; chance is 0.1, and a label path that lost
    # the label stays near it (12 steps: 0.097)
    assert 0.8 < res["conditional"]["accuracy"] <= 1 and res["conditional"]["judge_accuracy_on_test"] > 0.9
    assert list((tmp_path / "cache").glob("digits-classifier-*.safetensors"))
    # the Fréchet distance is that of the samples at the NFE asked for (--nfe 4, seed 0)
    x = load_run(run).sample(200, nfe=4, seed=0).clamp(0, 1)
    net = digit_classifier()
    with torch.no_grad():
        fd = frechet_distance(net.features(x).numpy(), net.features(load_digits_split("test")[0]).numpy())
    assert res["classifier"]["fd"] == pytest.approx(fd, rel=1e-9)


def test_reflow_and_distill_work_on_image_runs(cli, tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli("train", "--data", "digits", "--model", "mlp", "--width", "32", "--depth", "2", "--out", run,
                     "--no-plots", *SMALL)
    assert rc == 0, err
    for kind, out in (("reflow", tmp_path / "r2"), ("distill", tmp_path / "d")):
        rc, _, err = cli(kind, run, "--out", out, "--pairs", "64", "--shard-size", "32", "--teacher-nfe", "2",
                         "--steps", "4", "--batch-size", "16", "--no-progress", "--no-plots")
        assert rc == 0, err
        rc, _, err = cli("sample", out, "--n", "4", "--out", tmp_path / f"{kind}.npy", "--no-progress")
        assert rc == 0, err
        assert np.load(tmp_path / f"{kind}.npy").shape == (4, 1, 8, 8)
