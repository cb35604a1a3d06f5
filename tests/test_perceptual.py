"""RF++'s LPIPS-Huber loss with a perceptual distance the user supplies (``--loss lpips-huber
--perceptual FILE``): the loss against RF++'s reference formula written in its own time, the
command line end to end on a tiny diffusers teacher, and every file that cannot serve refused
in one line before anything is written."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmatch.errors import UserError
from flowmatch.objectives import Loss, cfm_loss
from flowmatch.paths import LinearPath
from flowmatch.perceptual import Perceptual

from helpers import one_line_error


class FeatureDistance(torch.nn.Module):
    """A stand-in for LPIPS: squared distance of random conv features, averaged per image pair."""

    def __init__(self, channels: int = 1):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(channels, 4, 3, padding=1)

    def forward(self, a, b):
        return (torch.tanh(self.conv(a)) - torch.tanh(self.conv(b))).pow(2).mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("perceptual") / "lpips.pt"
    torch.jit.save(torch.jit.script(FeatureDistance()), str(path))
    return path


def test_lpips_huber_is_rfpp_loss_in_its_own_time(lpips_file):
    """RF++'s code runs time the other way (s = 1 - t: data at 0, noise at 1): z_s = (1 - s) x1 +
    s x0, target x0 - x1, the network's prediction p, the implied data z_s - s p, and the loss
    (1 - s) H(p, target) + LPIPS(implied, x1), H = sqrt(||.||^2 + c^2) - c over D, c = 0.00054 D."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    t = torch.rand(6, generator=g)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)

    def model(x, t):  # a velocity field that depends on time
        return net(x) * (1 + t.reshape(-1, 1, 1, 1))

    d = FeatureDistance()
    ours = cfm_loss(model, LinearPath(), x0, x1, t, loss=Loss("lpips-huber", perceptual=Perceptual(lpips_file)))

    s = (1 - t).reshape(-1, 1, 1, 1)
    z = (1 - s) * x1 + s * x0
    p = -model(z, t)  # their network predicts x0 - x1: our velocity turned around
    dim = 64
    c = 0.00054 * dim
    huber = (((p - (x0 - x1)) ** 2).sum(dim=(1, 2, 3)) + c**2).sqrt().sub(c) / dim
    theirs = ((1 - s.flatten()) * huber + d(z - s * p, x1)).mean()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7), (ours, theirs)

    # the perceptual term carries gradient to the network: at t = 0 it is the whole loss
    net.zero_grad()
    zero = torch.zeros(6)
    cfm_loss(model, LinearPath(), x0, x1, zero, loss=Loss("lpips-huber", perceptual=Perceptual(lpips_file))).backward()
    assert net.weight.grad.abs().sum() > 0


def test_distill_with_lpips_huber_trains_and_records_the_file(cli, ddpm_dir, lpips_file, tmp_path):
    out = tmp_path / "student"
    rc, _, err = cli("distill", "--teacher", f"diffusers:{ddpm_dir}", "--unet", "tiny", "--pairs", "32", "--teacher-nfe", "2",
                     "--steps", "3", "--batch-size", "16", "--loss", "lpips-huber", "--perceptual", lpips_file,
                     "--out", out, "--no-progress", "--no-plots")
    assert rc == 0, err
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["loss"] == "lpips-huber" and train["perceptual"] == str(lpips_file.resolve())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(v == v and v >= 0 for v in losses)  # finite, and a distance is never negative


def _refused(cli, tmp_path, ddpm_dir, *options):
    out = tmp_path / "refused"
    rc, _, err = cli("distill", "--teacher", f"diffusers:{ddpm_dir}", "--pairs", "32", "--teacher-nfe", "2", "--steps", "2",
                     "--out", out, "--no-progress", "--no-plots", *options)
    assert not out.exists()  # nothing written
    return one_line_error(rc, err)


def test_what_cannot_serve_is_refused_before_anything_is_written(cli, ddpm_dir, lpips_file, tmp_path):
    assert "--perceptual" in _refused(cli, tmp_path, ddpm_dir, "--loss", "lpips-huber")
    assert "--loss lpips-huber" in _refused(cli, tmp_path, ddpm_dir, "--perceptual", lpips_file)
    assert "no such file" in _refused(cli, tmp_path, ddpm_dir, "--loss", "lpips-huber", "--perceptual", tmp_path / "nope.pt")
    notes = tmp_path / "notes.pt"
    notes.write_text("not a network")
    assert "TorchScript" in _refused(cli, tmp_path, ddpm_dir, "--loss", "lpips-huber", "--perceptual", notes)
    rgb = tmp_path / "rgb.pt"  # a module for colour images, on grey ones
    torch.jit.save(torch.jit.script(FeatureDistance(channels=3)), str(rgb))
    assert "failed on images of shape (1, 8, 8)" in _refused(cli, tmp_path, ddpm_dir, "--loss", "lpips-huber", "--perceptual", rgb)


def test_a_module_must_return_one_distance_per_pair(tmp_path):
    class Whole(torch.nn.Module):
        def forward(self, a, b):
            return (a - b).pow(2).mean()  # one number for the whole batch

    path = tmp_path / "whole.pt"
    torch.jit.save(torch.jit.script(Whole()), str(path))
    with pytest.raises(UserError, match=r"one distance per image pair \(2 here\), got \(\)"):
        Perceptual(path, (1, 8, 8))
    with pytest.raises(UserError, match="compares images"):
        Perceptual(path, (2,))


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=300))
def test_any_other_bytes_are_refused_as_not_torchscript(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "file.pt"
    path.write_bytes(data)
    with pytest.raises(UserError, match=r"^perceptual: .*file\.pt: expected a TorchScript file"):
        Perceptual(path, (1, 8, 8))
