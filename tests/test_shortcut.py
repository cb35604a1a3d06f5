"""Shortcut models against closed forms: for Gaussian data the straight path's flow is linear,
so the average velocity over any step is known, and two half steps of it make a full one."""

import json

import pytest
import torch

from flowmatch.config import TrainConfig
from flowmatch.objectives import Shortcut
from flowmatch.timesteps import UniformTime
from flowmatch.training import train

from helpers import TINY
from problems import MU, Gaussian, S, exact_model, exact_u, one_step_error


def test_self_consistency_holds_for_the_exact_flow():
    """u(z, t, 2d) = (u(z, t, d) + u(z + d u(z, t, d), t + d, d)) / 2 for the exact average velocity."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 2, generator=g, dtype=torch.float64) * 2
    d = torch.exp2(-torch.randint(1, 8, (500,), generator=g)).double()
    t = torch.rand(500, generator=g, dtype=torch.float64) * (1 - 2 * d)
    u1 = exact_u(z, t, d)
    u2 = exact_u(z + d[:, None] * u1, t + d, d)
    torch.testing.assert_close((u1 + u2) / 2, exact_u(z, t, 2 * d), rtol=1e-10, atol=1e-10)
    # and a step is not its instantaneous velocity: the test can see a wrong half step
    assert (exact_u(z, t, 2 * d) - exact_u(z, t, 0 * d)).abs().max() > 1e-2


def test_shortcut_draws_and_targets_on_the_exact_flow():
    """The draws: the first quarter of the batch are steps 2d = 1, 1/2, ..., 2/N from a multiple
    of 2d, the rest flow matching (h = 0). With the exact average velocity as the network, the
    targets are exact for every step but the finest (two Euler-like half steps on the velocity:
    off by O(d)), and flow matching's target is x1 - x0."""
    obj = Shortcut(UniformTime(), coupling=_Independent(), share=0.25, steps=128)
    g = torch.Generator().manual_seed(0)
    d = obj.draw(Gaussian().sample(4000, g), g)
    h = (d.t_end - d.t).double()
    assert (h[:1000] > 0).all() and (h[1000:] == 0).all()
    assert set(torch.log2(h[:1000]).round().int().tolist()) == set(range(-6, 1))  # steps 1 .. 1/64
    assert torch.allclose(d.t[:1000] / h[:1000], (d.t[:1000] / h[:1000]).round()) and (d.t_end <= 1).all()
    d.x0, d.x1, d.t, d.t_end = d.x0.double(), d.x1.double(), d.t.double(), d.t_end.double()
    pred, target = obj.target(exact_model, d)
    z = (1 - d.t[:, None]) * d.x0 + d.t[:, None] * d.x1
    torch.testing.assert_close(pred, exact_u(z, d.t, h))
    torch.testing.assert_close(target[1000:], (d.x1 - d.x0)[1000:])
    coarse = h[:1000] > 2 / 128
    torch.testing.assert_close(target[:1000][coarse], exact_u(z, d.t, h)[:1000][coarse], rtol=1e-9, atol=1e-9)
    # the finest steps: two Euler steps of the exact velocity (first order: off by O(d) from the exact step)
    zf, tf, half = z[:1000][~coarse], d.t[:1000][~coarse], h[:1000][~coarse] / 2
    v1 = exact_u(zf, tf, 0 * half)
    euler = (v1 + exact_u(zf + half[:, None] * v1, tf + half, 0 * half)) / 2
    torch.testing.assert_close(target[:1000][~coarse], euler, rtol=1e-9, atol=1e-9)
    assert (euler - exact_u(zf, tf, 2 * half)).abs().max() < 0.1


class _Independent:
    def pair(self, x0, x1, gen, label=None):
        return x0, x1, label


def test_trained_shortcut_approaches_the_exact_flow_map(tmp_path):
    """A small MLP trained as a shortcut model: its one-step map approaches the exact one,
    MU + (S - 1) z, and 1, 2 and 4 steps from noise give the data's mean and std. Half of each
    batch self-consistency (the default quarter: one-step std 0.435 against 0.5 at this budget;
    the chain of step sizes learns from the finest up, one level after another)."""
    cfg = TrainConfig(objective="shortcut", shortcut_share=0.5, steps=2000, batch_size=256, lr=3e-3, warmup_steps=50, width=64, depth=3,
                      fourier=0, ema_decay=0.99, plots=False)
    run = train(cfg, out=tmp_path / "sc", progress=False, parts=cfg.build({"name": "gaussian-test"}, dataset=Gaussian()))
    model, z, _, err, scale = one_step_error(cfg, run)
    zeros, ones = torch.zeros(len(z)), torch.ones(len(z))
    with torch.no_grad():
        assert err < 0.1 * scale, (err, scale)
        for k in (1, 2, 4):
            x = z.clone()
            for i in range(k):
                x = x + model(x, zeros + i / k, h=ones / k) / k
            assert (x.mean(0) - MU).abs().max() < 0.05 and (x.std(0) - S).abs().max() < 0.05, (k, x.mean(0), x.std(0))


def test_shortcut_from_the_command_line(cli, tmp_path):
    """train --objective shortcut is saved in config.json; sample takes one step of the network,
    eval reports 1, 2 and 4 steps; a finest step that is not a power of 2 is refused."""
    run = tmp_path / "sc"
    rc, _, err = cli("train", "--objective", "shortcut", "--shortcut-steps", "64", "--steps", "3", "--batch-size", "32",
                     "--no-plots", "--out", run, *TINY)
    assert rc == 0, err
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["objective"] == "shortcut" and saved["shortcut_steps"] == 64
    from flowmatch.runs import load_run

    r = load_run(run)
    assert r.default_nfe == 1
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        half = z + 0.5 * r.model(z, torch.zeros(10), h=torch.full((10,), 0.5))
        two = r.dataset.decode(half + 0.5 * r.model(half, torch.full((10,), 0.5), h=torch.full((10,), 0.5)))
    torch.testing.assert_close(r.flow(z, nfe=2).x, two)
    rc, out, err = cli("eval", run, "--nfe", "1,2,4", "--n", "200", "--repeats", "1", "--json")
    assert rc == 0, err
    assert list(json.loads(out)["nfe"]) == ["1", "2", "4"]


@pytest.mark.parametrize("option", [("--shortcut-steps", "100"), ("--shortcut-share", "1.5"), ("--loss", "pseudo-huber")])
def test_bad_shortcut_settings_are_one_line(cli, tmp_path, option):
    rc, _, err = cli("train", "--objective", "shortcut", *option, "--out", tmp_path / "bad", *TINY)
    assert rc == 2 and option[0] in err and not (tmp_path / "bad").exists(), err
