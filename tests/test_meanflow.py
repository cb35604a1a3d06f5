"""MeanFlow against closed forms: for Gaussian data the flow of the straight path is linear, so
the average velocity over any interval is known exactly."""

import json

import pytest
import torch

from flowmatch.config import TrainConfig
from flowmatch.data import Batch
from flowmatch.objectives import Drawn, MeanFlow, MeanFlowOptions
from flowmatch.timesteps import UniformTime
from flowmatch.training import train

from helpers import TINY, optimal_assignment
from problems import MU, Gaussian, S, exact_model, exact_u, sigma


def posterior_draws(z, t: float, t_end: float, n: int, g) -> Drawn:
    """n draws given z_t = z for the Gaussian data: x1 from its posterior, x0 = (z - t x1) / (1 - t)."""
    tt = torch.full((n,), t, dtype=torch.float64)
    var = sigma(tt[:1]) ** 2
    mean1 = MU + t * S**2 / var * (z - t * MU)
    sd1 = (S**2 - t**2 * S**4 / var).clamp_min(0).sqrt()
    x1 = mean1 + sd1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return Drawn((z - t * x1) / (1 - t), x1, tt, None, torch.full((n,), t_end, dtype=torch.float64))


def test_meanflow_target_averages_to_the_exact_average_velocity():
    """E[target | z_t = z] = u(z, t, t_end): the MeanFlow identity u = v + (t_end - t) du/dt in
    this package's time, with the conditional velocity x1 - x0 in place of the marginal one."""
    g = torch.Generator().manual_seed(0)
    obj = MeanFlow(UniformTime())
    for t, t_end in ((0.0, 1.0), (0.2, 0.7), (0.5, 0.55), (0.3, 0.3)):
        z, n = torch.tensor([[0.7, -0.4]], dtype=torch.float64), 400_000
        d = posterior_draws(z, t, t_end, n, g)
        tt = d.t
        pred, target = obj.target(exact_model, d)
        want = exact_u(z, tt[:1], tt[:1] * 0 + (t_end - t))
        torch.testing.assert_close(pred, want.expand_as(pred), rtol=1e-9, atol=1e-9)  # the model's input is z
        se = target.std(0) / n**0.5
        assert ((target.mean(0) - want[0]).abs() < 5 * se + 1e-9).all(), (t, t_end, target.mean(0), want)


def test_the_model_tangent_keeps_the_mean_and_changes_the_spread_as_the_flow_does():
    """tangent="model" (improved MeanFlow): the JVP along the network's own velocity. At the exact
    field the targets still average to u(z, t, t_end); given z_t only x1 - x0 varies, so the
    conditional tangent's target is (I + h du/dz)(x1 - x0) + const and the model tangent's is (x1 -
    x0) + const. For Gaussian data I + h du/dz = sigma(t_end) / sigma(t): the variances' ratio is
    known (here the flow contracts, so the paper's conditional tangent varies less)."""
    g = torch.Generator().manual_seed(1)
    cond, model = MeanFlow(UniformTime()), MeanFlow(UniformTime(), options=MeanFlowOptions(tangent="model"))
    for t, t_end in ((0.0, 1.0), (0.2, 0.7), (0.4, 0.4)):
        z, n = torch.tensor([[-0.3, 1.1]], dtype=torch.float64), 100_000
        d = posterior_draws(z, t, t_end, n, g)
        want = exact_u(z, d.t[:1], d.t[:1] * 0 + (t_end - t))[0]
        targets = {}
        for name, obj in (("conditional", cond), ("model", model)):
            _, targets[name] = obj.target(exact_model, d)
            se = targets[name].std(0) / n**0.5
            assert ((targets[name].mean(0) - want).abs() < 5 * se + 1e-9).all(), (name, t, t_end)
        ratio = targets["conditional"].var(0) / targets["model"].var(0)
        expected = float(sigma(torch.tensor(t_end)) / sigma(torch.tensor(t))) ** 2
        torch.testing.assert_close(ratio, torch.full_like(ratio, expected), rtol=0.02, atol=0)


@pytest.mark.full  # 3000 steps, two minutes: the full tier; CI learns the map from the exact field (test_init.py)
def test_trained_meanflow_approaches_the_exact_one_step_map(tmp_path):
    """A small MLP trained with the MeanFlow objective: its average velocity over [0, 1]
    approaches the exact MU + (S - 1) z, and one step from noise gives the data's mean and std.
    Plain MSE (power 0): at this budget the paper's adaptive weight (power 1) converged slower
    (one-step std 0.33 against 0.42 for MSE after 1500 steps; MSE reaches 0.47 at 3000)."""
    # the recipe's OT pairs and own-trajectory rows stay: with independent pairs and no own rows (the settings
    # this test was written with) the one step's mean missed by 0.09 on the current draws
    cfg = TrainConfig(objective="meanflow", meanflow_share=0.5, meanflow_power=0.0, time_dist="uniform", steps=3000,
                      batch_size=256, lr=3e-3, warmup_steps=50,
                      width=64, depth=3, fourier=0, ema_decay=0.99, plots=False)
    run = train(cfg, out=tmp_path / "mf", progress=False, parts=cfg.build({"name": "gaussian-test"}, dataset=Gaussian()))
    from flowmatch.models import make_model

    model = make_model(cfg.model_spec((2,)), (2,))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(run / "ema.safetensors"))
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        u = model(z, torch.zeros(4000), h=torch.ones(4000))
    err = (u - exact_u(z, torch.zeros(4000), torch.ones(4000))).pow(2).sum(1).mean().sqrt()
    scale = exact_u(z, torch.zeros(4000), torch.ones(4000)).pow(2).sum(1).mean().sqrt()
    assert err < 0.1 * scale, (err, scale)  # t * 10000 as the time embedding gave 0.62
    x = z + u
    assert (x.mean(0) - MU).abs().max() < 0.05 and (x.std(0) - S).abs().max() < 0.06, (x.mean(0), x.std(0))


def test_meanflow_from_the_command_line(cli, tmp_path):
    """train --objective meanflow is saved in config.json; sample and eval use its one step."""
    run = tmp_path / "mf"
    rc, _, err = cli("train", "--objective", "meanflow", "--steps", "3", "--batch-size", "32", "--no-plots", "--out", run, *TINY)
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["train"]["objective"] == "meanflow"
    rc, _, err = cli("sample", run, "--out", tmp_path / "x.npy", "--n", "10", "--no-progress")
    assert rc == 0, err
    from flowmatch.runs import load_run

    r = load_run(run)
    assert r.default_nfe == 1
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one_step = r.dataset.decode(z + r.model(z, torch.zeros(10), h=torch.ones(10)))
    torch.testing.assert_close(r.flow(z, nfe=1).x, one_step)
    rc, out, err = cli("eval", run, "--nfe", "1,2", "--n", "200", "--repeats", "1", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert list(res["nfe"]) == ["1", "2"], res
    rc, _, err = cli("train", "--objective", "meanflow", "--path", "vp", "--out", tmp_path / "bad", *TINY)
    assert rc == 2 and "--path" in err and not (tmp_path / "bad").exists()


def test_the_unet_takes_the_interval_beside_time_and_label():
    """An interval UNet: h = None is h = 0; h and the label each change the output; the MeanFlow
    JVP runs through it and its primal output is the network's prediction."""
    from flowmatch.models import make_model

    torch.manual_seed(0)
    net = make_model({"name": "unet", "interval": True}, (1, 8, 8), num_classes=10).eval()
    x = torch.randn(4, 1, 8, 8)
    t, h, lab = torch.full((4,), 0.3), torch.full((4,), 0.5), torch.tensor([0, 1, 2, -1])
    with torch.no_grad():
        base = net(x, t, lab)
        torch.testing.assert_close(net(x, t, lab, h=torch.zeros(4)), base)
        assert (net(x, t, lab, h=h) - base).abs().max() > 1e-4
        assert (net(x, t, torch.tensor([3, 1, 2, -1]), h=h)[0] - net(x, t, lab, h=h)[0]).abs().max() > 1e-4
        torch.testing.assert_close(net(x, t, torch.full((4,), -1), h=h), net(x, t, None, h=h))  # the null class
    d = Drawn(torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), t, lab, t + h)
    pred, target = MeanFlow(UniformTime()).target(net, d)
    torch.testing.assert_close(pred, net(0.7 * d.x0 + 0.3 * d.x1, t, lab, h=h), rtol=1e-4, atol=1e-5)
    assert pred.requires_grad and not target.requires_grad and torch.isfinite(target).all()


def test_the_unet_sees_time_at_the_runs_scale():
    """The UNet's sines see time_scale * t, for t and the interval alike: 1000 (diffusers') for
    flow matching, 10 for one-step objectives (at 1000 MeanFlow's d/dt u swamped its target on
    digits), the setting when given; the same weights at scales 10 and 1000 agree at t * 100."""
    import copy

    from flowmatch.models import make_model

    scale = {}
    for objective, given in (("cfm", None), ("meanflow", None), ("shortcut", None), ("meanflow", 50.0), ("cfm", 3.0)):
        cfg = TrainConfig(objective=objective, time_scale=given).validate()
        scale[objective, given] = cfg.build_model((1, 8, 8), 10).time_scale
        mlp = given if given is not None else 10.0 if objective != "cfm" else 10000.0  # the MLP's, as before
        assert cfg.model_spec((2,))["time_scale"] == mlp
    assert scale == {("cfm", None): 1000.0, ("meanflow", None): 10.0, ("shortcut", None): 10.0,
                     ("meanflow", 50.0): 50.0, ("cfm", 3.0): 3.0}
    torch.manual_seed(0)
    net = make_model({"name": "unet", "interval": True, "time_scale": 10.0}, (1, 8, 8), num_classes=10).eval()
    wide = copy.deepcopy(net)
    wide.time_scale = 1000.0
    x, t, h, lab = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.5, 0.2, 0.05]), torch.tensor([1, 2, -1])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, lab, h=h), wide(x, t / 100, lab, h=h / 100))
        assert (net(x, t, lab, h=h) - wide(x, t, lab, h=h)).abs().max() > 1e-3


def test_meanflow_on_digits_from_the_command_line(cli, tmp_path):
    """Images train a class-conditional interval UNet; a guided one-step sample is written."""
    run = tmp_path / "mf"
    rc, _, err = cli("train", "--data", "digits", "--objective", "meanflow", "--steps", "2", "--batch-size", "8",
                     "--no-plots", "--no-progress", "--out", run)
    assert rc == 0, err
    rc, _, err = cli("sample", run, "--label", "3", "--guidance", "2", "--n", "4", "--out", tmp_path / "x.npy",
                     "--no-progress")
    assert rc == 0, err
    import numpy as np

    x = np.load(tmp_path / "x.npy")
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all()
    from flowmatch.runs import load_run

    doc = json.loads((run / "config.json").read_text())
    assert doc["train"]["time_scale"] == 10.0 and load_run(run).model.time_scale == 10.0  # recorded as built
    doc["train"]["time_scale"] = None  # a one-step image run written before the scale was recorded: t * 1000
    (run / "config.json").write_text(json.dumps(doc))
    assert load_run(run).model.time_scale == 1000.0


def test_data_prediction_takes_the_interval():
    """--prediction data with an interval network: the network D(z, t, h) says where the step's
    average velocity heads, u = (D - z) / (1 - t) on the straight path (one full step lands on D)."""
    from flowmatch.models import make_model
    from flowmatch.paths import LinearPath

    cfg = TrainConfig(objective="shortcut", prediction="data", width=32, depth=2).validate()
    torch.manual_seed(0)
    net = make_model(cfg.model_spec((2,)), (2,), path=LinearPath())
    z, t, h = torch.randn(5, 2), torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9]), torch.tensor([1.0, 0.5, 0.25, 0.3, 0.1])
    with torch.no_grad():
        d = net.net(z, t, h=h)
        torch.testing.assert_close(net(z, t, h=h), (d - z) / (1 - t)[:, None])
        torch.testing.assert_close(z[:1] + net(z[:1], t[:1], h=h[:1]), d[:1])  # one step from noise: D itself
        assert (net(z, t, h=h) - net(z, t)).abs().max() > 1e-4


def test_flow_matching_pairs_take_one_draw_or_the_earlier_of_two():
    """The pairs with t_end = t: fm_time="single" draws their t from the time sampler, as CFM does
    (uniform: mean 1/2, CDF t); "paired" (the paper's code) takes the earlier of the two sorted
    draws (uniform: the minimum of two, mean 1/3, CDF 1 - (1 - t)^2). The interval pairs are the
    same sorted draws either way."""
    from flowmatch.couplings import IndependentCoupling
    from flowmatch.data import Batch

    n = 200_000
    batch = Batch(torch.zeros(n, 2))
    for fm_time, cdf in (("single", lambda t: t), ("paired", lambda t: 1 - (1 - t) ** 2)):
        obj = MeanFlow(UniformTime(), IndependentCoupling(), MeanFlowOptions(share=0.5, fm_time=fm_time))
        d = obj.draw(batch, torch.Generator().manual_seed(0))
        fm, iv = d.t_end == d.t, d.t_end > d.t
        assert abs(fm.float().mean() - 0.5) < 0.01
        for q in (0.1, 0.3, 0.5, 0.8):
            assert abs((d.t[fm] < q).float().mean() - cdf(q)) < 0.01, (fm_time, q)
            assert abs((d.t[iv] < q).float().mean() - (1 - (1 - q) ** 2)) < 0.01  # the earlier of two
            assert abs((d.t_end[iv] < q).float().mean() - q**2) < 0.01  # the later of two


def test_a_share_of_the_intervals_ends_at_the_data(cli, tmp_path):
    """``to_data``: that share of the interval pairs is [t, 1] (the family of the one step, closed
    under the MeanFlow identity, whose derivative holds t_end); their starts keep the earlier of two
    draws, the other intervals and the flow-matching pairs are drawn as without it, and 0 draws
    exactly what MeanFlow drew before the setting existed."""
    from flowmatch.couplings import IndependentCoupling
    from flowmatch.data import Batch

    n = 200_000
    batch = Batch(torch.zeros(n, 2))
    base = MeanFlow(UniformTime(), IndependentCoupling(), MeanFlowOptions(share=0.5, fm_time="single"))
    d0 = base.draw(batch, torch.Generator().manual_seed(0))
    off = MeanFlow(UniformTime(), IndependentCoupling(), MeanFlowOptions(share=0.5, fm_time="single", to_data=0.0))
    d_off = off.draw(batch, torch.Generator().manual_seed(0))
    assert torch.equal(d0.t, d_off.t) and torch.equal(d0.t_end, d_off.t_end)
    for share in (0.3, 1.0):
        obj = MeanFlow(UniformTime(), IndependentCoupling(), MeanFlowOptions(share=0.5, fm_time="single", to_data=share))
        d = obj.draw(batch, torch.Generator().manual_seed(0))
        fm, iv = d.t_end == d.t, d.t_end > d.t
        assert abs(fm.float().mean() - 0.5) < 0.01
        assert torch.equal(d.t[fm], d0.t[fm])  # the flow-matching pairs are untouched
        ends = iv & (d.t_end == 1)
        assert abs(ends.float().sum() / iv.float().sum() - share) < 0.01
        assert torch.equal(d.t[iv], d0.t[iv])  # the starts: the earlier of two draws
        for q in (0.1, 0.3, 0.5, 0.8):
            assert abs((d.t[ends] < q).float().mean() - (1 - (1 - q) ** 2)) < 0.01
            rest = iv & ~ends
            if rest.any():
                assert abs((d.t_end[rest] < q).float().mean() - q**2) < 0.01  # the later of two
    cfg = TrainConfig(objective="meanflow", meanflow_to_data=0.5)
    assert TrainConfig.from_dict(cfg.to_dict()).meanflow_to_data == 0.5
    rc, _, err = cli("train", "--objective", "meanflow", "--meanflow-to-data", "1.5", "--out", tmp_path / "bad", *TINY)
    assert rc == 2 and "--meanflow-to-data" in err and not (tmp_path / "bad").exists(), err


def test_meanflow_time_defaults_follow_the_objective_and_old_runs_keep_theirs(cli, tmp_path):
    """Left unset, the time distribution is logit-normal(0.4, 1) for MeanFlow and uniform for the
    others; a setting given wins. A config.json written before meanflow_fm_time existed rebuilds
    the paired flow-matching times it was trained with."""
    from flowmatch.data import make_dataset, spec_from_arg

    toy = make_dataset(spec_from_arg("checkerboard"))
    mf, cfm = TrainConfig(objective="meanflow").resolve(toy), TrainConfig().resolve(toy)
    assert (mf.time_dist, mf.time_mean, mf.meanflow_fm_time) == ("logit-normal", 0.4, "single")
    assert (cfm.time_dist, cfm.time_mean) == ("uniform", 0.0)
    assert TrainConfig(objective="meanflow", time_dist="uniform", time_mean=0.0).resolve(toy).time_dist == "uniform"
    assert TrainConfig.from_dict(mf.to_dict()) == mf
    old = {k: v for k, v in mf.to_dict().items() if k != "meanflow_fm_time"}
    assert TrainConfig.from_dict(old).meanflow_fm_time == "paired"
    rc, out, err = cli("train", "--objective", "meanflow", "--print-config", *TINY)
    assert rc == 0, err
    assert 'time_dist = "logit-normal"' in out and "time_mean = 0.4" in out, out
    rc, out, err = cli("train", "--objective", "meanflow", "--time-dist", "uniform", "--print-config", *TINY)
    assert rc == 0 and 'time_dist = "uniform"' in out, err
    rc, _, err = cli("train", "--objective", "meanflow", "--meanflow-fm-time", "both", "--out", tmp_path / "bad", *TINY)
    assert rc == 2 and "--meanflow-fm-time" in err and not (tmp_path / "bad").exists(), err


def _reference_meanflow_loss(net, obj: MeanFlow, d: Drawn) -> torch.Tensor:
    """The MeanFlow loss written out with one JVP over every row (the flow-matching rows too)."""
    z = (1 - d.t[:, None]) * d.x0 + d.t[:, None] * d.x1
    v = d.x1 - d.x0
    pred, du_dt = torch.func.jvp(lambda z, t, e: net(z, t, d.label, h=e - t), (z, d.t, d.t_end),
                                 (v, torch.ones_like(d.t), torch.zeros_like(d.t)))
    target = (v + (d.t_end - d.t)[:, None] * du_dt).detach()
    err = (pred - target).pow(2).sum(1)
    return (err / (err.detach() + obj.options.c) ** obj.options.power).mean()


def test_the_jvp_on_the_interval_rows_only_gives_the_loss_and_gradient_of_one_over_all_rows():
    """The flow-matching rows (t_end = t) skip the JVP (its term is multiplied by zero): loss and
    gradients equal the loss written with one JVP over the whole batch, on a mixed batch (with
    labels), on a batch of intervals alone and on one of flow-matching rows alone, and through a
    wrapper (DDP's and torch.compile's path: the JVP on the bare module without a graph)."""
    from flowmatch.models import make_model

    torch.manual_seed(0)
    net = make_model({"name": "mlp", "width": 32, "depth": 2, "interval": True}, (2,), num_classes=3)
    obj = MeanFlow(UniformTime(), options=MeanFlowOptions(power=0.5))

    class Wrapper(torch.nn.Module):  # stands for torch.compile's wrapper: _bare() unwraps _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

        def forward(self, *a, **kw):
            return self._orig_mod(*a, **kw)

    g = torch.Generator().manual_seed(3)
    n = 64
    t = torch.rand(n, generator=g)
    mixed = torch.where(torch.rand(n, generator=g) < 0.5, t, t + (1 - t) * torch.rand(n, generator=g))
    for t_end in (mixed, t + (1 - t) * 0.5, t.clone()):
        d = Drawn(torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g), t, torch.randint(0, 3, (n,), generator=g),
                  t_end)
        net.zero_grad()
        want = _reference_meanflow_loss(net, obj, d)
        want.backward()
        want_grads = [p.grad.clone() for p in net.parameters()]
        for model, o in ((net, obj), (Wrapper(net), obj)):
            net.zero_grad()
            got = o.loss(model, d)
            got.backward()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            for a, b in zip((p.grad for p in net.parameters()), want_grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_under_cpu_bf16_autocast_the_mlp_jvp_runs_in_bf16_and_the_unets_in_fp32():
    """CPU bf16 autocast: the MLP's JVP runs in bf16 (its target moves from the fp32 one by bf16's
    rounding, not more), while a network with convolutions takes its JVP in fp32 (CPU autocast
    casts a convolution's input but not its tangent): its target equals the fp32 one to fp32's
    rounding, and the JVP runs at all. Both at the one-step objectives' time scale (t * 10)."""
    from flowmatch.models import make_model

    obj = MeanFlow(UniformTime())
    for spec, shape, bf16_jvp in (({"name": "mlp", "width": 64, "depth": 3}, (2,), True), ({"name": "unet"}, (1, 8, 8), False)):
        torch.manual_seed(0)
        net = make_model(spec | {"interval": True, "time_scale": 10.0}, shape, num_classes=0).eval()
        n = 16
        t = torch.rand(n) * 0.8
        d = Drawn(torch.randn(n, *shape), torch.randn(n, *shape), t, None, t + 0.2)
        _, want = obj.target(net, d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred, got = obj.target(net, d)
        # the one-pass JVP's primal output is the prediction: bf16 where the JVP ran in bf16
        assert pred.dtype == (torch.bfloat16 if bf16_jvp else torch.float32) and got.dtype == torch.float32
        rel = ((got - want).norm() / want.norm()).item()
        if bf16_jvp:  # bf16's 8 significant bits in the derivative term: about 1e-3 of the target
            assert 1e-5 < rel < 1e-2, rel
        else:
            assert rel < 1e-5, rel


def test_meanflow_pairs_noise_and_data_by_the_minibatch_ot_plan():
    """--objective meanflow --coupling ot: the interval and flow-matching rows alike are drawn
    from the optimal assignment of the batch's noise to its data (solved independently by scipy's
    Hungarian method), not from the product coupling; the straight path between the pairs is then
    what the average velocity integrates."""
    from flowmatch.couplings import OTCoupling
    from flowmatch.data import Batch

    g = torch.Generator().manual_seed(0)
    x1 = 3 + 2 * torch.randn(256, 2, generator=g)
    d = MeanFlow(UniformTime(), OTCoupling(), MeanFlowOptions(share=0.5)).draw(Batch(x1), torch.Generator().manual_seed(1))
    assert torch.equal(d.x1, x1) and (d.t_end > d.t).any() and (d.t_end == d.t).any()
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))  # the draw's own noise
    assert torch.equal(torch.sort(d.x0[:, 0]).values, torch.sort(noise[:, 0]).values)  # a permutation of it
    cost = torch.cdist(noise.double(), x1.double()).pow(2).numpy()
    optimum = optimal_assignment(noise, x1)[1]
    paired = (d.x0.double() - x1.double()).pow(2).sum(1).mean().item()
    assert abs(paired - optimum) <= 1e-6 * optimum
    assert cost.trace() / len(cost) > 1.3 * optimum  # the product coupling is far from it


def test_own_trajectories_give_the_exact_average_velocity_of_the_teachers_flow(cli, tmp_path):
    """--meanflow-distill: with the exact Gaussian flow as the teacher, the rows drawn from its
    midpoint trajectories carry targets equal to the closed-form average velocity over their
    interval (to the midpoint rule's error); half of them span the whole step [0, 1], the others two
    distinct grid points. The trajectories start at ``distill_start`` of the steps and are refreshed
    every ``distill_every`` steps; the target pass gives those rows their fixed targets, with no
    derivative term."""
    from flowmatch.couplings import IndependentCoupling

    obj = MeanFlow(UniformTime(), IndependentCoupling(), MeanFlowOptions(share=0.5, fm_time="single", distill=0.5,
                   distill_start=0.5, distill_every=10, distill_pairs=2000, distill_nfe=64))
    gen = torch.Generator().manual_seed(0)
    obj.refresh(exact_model, 49, 100, Gaussian(), 0)
    assert obj.trajectories is None  # before the start
    obj.refresh(exact_model, 50, 100, Gaussian(), 0)
    path, label = obj.trajectories
    assert path.shape == (33, 2000, 2) and label is None
    first = path
    obj.refresh(exact_model, 55, 100, Gaussian(), 0)
    assert obj.trajectories[0] is first  # not yet time to refresh
    obj.refresh(exact_model, 60, 100, Gaussian(), 0)
    assert obj.trajectories[0] is not first
    batch = Batch(torch.randn(4000, 2, generator=gen).double() * S + MU)
    d = obj.draw(Batch(batch.x1.float()), gen)
    z, t, h, _, target = d.own
    assert len(z) == 2000 and (h > 0).all() and (t + h <= 1 + 1e-6).all()
    whole = (t == 0) & (h == 1)
    assert abs(whole.float().mean() - (0.5 + 0.5 / 528)) < 0.03  # 528 pairs of the 33 grid points, one of them whole
    torch.testing.assert_close(target.double(), exact_u(z.double(), t.double(), h.double()), rtol=1e-4, atol=1e-4)
    obj.options.distill_whole = 1.0
    _, t1, h1, _, _ = obj.own_rows(4000, gen)
    assert (t1 == 0).all() and (h1 == 1).all()
    pred, tgt = obj.target(exact_model, Drawn(d.x0.double(), d.x1.double(), d.t.double(), None, d.t_end.double(),
                                              None, tuple(None if a is None else a.double() for a in d.own)))
    torch.testing.assert_close(tgt[-len(z):], target.double())  # the own rows: their fixed targets
    torch.testing.assert_close(pred[-len(z):], exact_model(z.double(), t.double(), h=h.double()))
    rc, _, err = cli("train", "--objective", "meanflow", "--meanflow-distill-nfe", "3", "--out", tmp_path / "bad", *TINY)
    assert rc == 2 and "--meanflow-distill-nfe" in err and not (tmp_path / "bad").exists(), err


def test_meanflow_with_own_trajectories_trains_from_the_command_line(cli, tmp_path):
    """--meanflow-distill in a short run on the checkerboard: it trains, saves the settings, and
    its one step samples."""
    run = tmp_path / "mfd"
    rc, _, err = cli("train", "--objective", "meanflow", "--steps", "12", "--batch-size", "32", "--no-plots",
                     "--meanflow-distill", "0.25", "--meanflow-distill-every", "3", "--meanflow-distill-pairs", "64",
                     "--out", run, *TINY)
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["train"]["meanflow_distill"] == 0.25
    rc, _, err = cli("sample", run, "--n", "64", "--out", tmp_path / "s.npy", "--no-progress")
    assert rc == 0 and (tmp_path / "s.npy").exists(), err


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_own_trajectories_follow_the_datas_labels(dropout):
    """On labelled data the teacher integrates each trajectory under a label drawn with the data, dropped to
    the null label as often as the batches' labels are (those trajectories teach the unconditional map),
    and the rows drawn from it carry that label."""
    from flowmatch.couplings import IndependentCoupling

    class Labelled(Gaussian):
        num_classes = 3

        def sample(self, n, generator):
            b = super().sample(n, generator)
            return Batch(b.x1, label=torch.randint(3, (n,), generator=generator))

    seen = []

    def teacher(z, t, label=None, h=None):  # velocity = the label: the trajectory ends at z0 + label
        seen.append(label)
        return label[:, None].to(z.dtype).expand_as(z)

    obj = MeanFlow(UniformTime(), IndependentCoupling(), MeanFlowOptions(distill=1.0, distill_start=0.0, distill_pairs=500,
                                                                         distill_nfe=4), label_dropout=dropout)
    gen = torch.Generator().manual_seed(0)
    obj.refresh(teacher, 0, 10, Labelled(), 0)
    assert all(s is seen[0] for s in seen) and set(seen[0].tolist()) == {0, 1, 2} | ({-1} if dropout else set())
    null = (seen[0] == -1).float().mean().item()
    assert abs(null - dropout) < 0.07, null  # 500 draws: sd 0.022
    z, t, h, label, target = obj.own_rows(300, gen)
    torch.testing.assert_close(target, label[:, None].float().expand_as(target))
