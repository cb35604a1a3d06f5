"""The stable target field (--stf): flow matching's conditional target averaged over the posterior
of a reference set of data given x_t, checked against the closed-form marginal field."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowmatch.couplings import make_coupling
from flowmatch.data import Batch
from flowmatch.objectives import CFM, stable_target
from flowmatch.paths import LinearPath, make_path, marginal_velocity
from flowmatch.timesteps import make_time_sampler

from helpers import TINY, one_line_error

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _draw(n, d, g, t_max=0.95):
    x0, x1 = torch.randn(n, d, generator=g, dtype=torch.float64), 2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x0, x1, 0.02 + (t_max - 0.02) * torch.rand(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", ["linear", "vp", "cosine"])
def test_on_a_whole_data_set_it_is_the_marginal_field(name):
    """The reference set is the batch's own data then the extra points; on a finite data set taken
    whole, the target at x_t is the exact marginal field of that set (the posterior mean)."""
    path, g = make_path(name), torch.Generator().manual_seed(0)
    x0, x1, t = _draw(40, 3, g)
    data = torch.randn(25, 3, generator=g, dtype=torch.float64)
    a, s, _, _ = (v[:, None] for v in path.schedule(t))
    expected = marginal_velocity(path, a * x1 + s * x0, t, torch.cat([x1, data]))
    torch.testing.assert_close(stable_target(path, x0, x1, t, data), expected, rtol=1e-9, atol=1e-9)


def test_near_the_data_and_alone_it_is_the_conditional_target():
    path, g = LinearPath(), torch.Generator().manual_seed(1)
    x0, x1, _ = _draw(64, 2, g)
    data = torch.randn(500, 2, generator=g, dtype=torch.float64)
    conditional = lambda t: path.sample(x0, x1, t).u_t  # noqa: E731
    for t in (torch.full((64,), 1 - 1e-7, dtype=torch.float64), torch.ones(64, dtype=torch.float64)):
        target = stable_target(path, x0, x1, t, data)  # sigma -> 0: the weight is on the row's own x1
        assert torch.isfinite(target).all()
        torch.testing.assert_close(target, conditional(t), rtol=0, atol=1e-12)
    t = torch.rand(64, generator=g, dtype=torch.float64)
    for i in range(3):  # a reference of one point: the conditional target, at any time
        one = slice(i, i + 1)
        torch.testing.assert_close(stable_target(path, x0[one], x1[one], t[one], data[:0]), conditional(t)[one])
    # float32 batches, as training passes them: the same target to float32's precision
    t32 = t.float()
    torch.testing.assert_close(stable_target(path, x0.float(), x1.float(), t32, data.float()),
                               stable_target(path, x0, x1, t32.double(), data).float(), rtol=1e-4, atol=1e-4)


def test_labelled_rows_average_within_their_class():
    """Also over a reference large enough that the rows are taken a few at a time (chunks)."""
    path, g = LinearPath(), torch.Generator().manual_seed(2)
    n, k = 200, 4000
    x0, x1, t = _draw(n, 2, g)
    data = torch.randn(k, 2, generator=g, dtype=torch.float64)
    label, ref_label = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (k,), generator=g)
    label[:5] = -1  # dropped for classifier-free guidance: the unconditional field
    target = stable_target(path, x0, x1, t, data, label, ref_label)
    pool, pool_label = torch.cat([x1, data]), torch.cat([label, ref_label])
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    for i in range(n):
        rows = pool if label[i] < 0 else pool[pool_label == label[i]]
        torch.testing.assert_close(target[i:i + 1], marginal_velocity(path, x_t[i:i + 1], t[i:i + 1], rows))


def test_it_lowers_the_variance_of_the_target_and_keeps_its_mean():
    """Given x_t, the conditional target u_t = x1 - x0 varies with the unseen x1; the stable
    target averages it out. Gaussian data N(0, 4 I): the posterior of x1 given x_t is Gaussian, so
    the plain targets' mean at x_t is known in closed form, and the stable ones (over 4096 fresh
    draws of the data each time) must have the same mean and a far smaller spread."""
    path, g = LinearPath(), torch.Generator().manual_seed(3)
    z, t = torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.4
    var = t**2 * 4 + (1 - t) ** 2  # x_t's variance
    post_mean, post_var = t * 4 / var * z, 4 - (t * 4) ** 2 / var  # x1 given x_t = z
    n = 400
    x1 = post_mean + post_var**0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x0 = (z - t * x1) / (1 - t)
    tt = torch.full((n,), t, dtype=torch.float64)
    plain = path.sample(x0, x1, tt).u_t
    stable = torch.cat([stable_target(path, x0[i:i + 1], x1[i:i + 1], tt[i:i + 1],
                                      2 * torch.randn(4096, 2, generator=g, dtype=torch.float64)) for i in range(n)])
    exact = (post_mean - z) / (1 - t)  # the marginal field at z
    torch.testing.assert_close(plain.mean(0, keepdim=True), exact, atol=4 * (post_var / n) ** 0.5 / (1 - t), rtol=0)
    torch.testing.assert_close(stable.mean(0, keepdim=True), exact, atol=0.02, rtol=0)
    assert stable.var(0).max() < plain.var(0).min() / 100


def test_the_objective_draws_its_extra_points_after_the_batch():
    """CFM with stf draws the reference from the data set with the step's generator, after the
    batch's own draws: the noise, times and pairs are those of the plain objective."""
    class Data:
        def sample(self, n, gen):
            return Batch(torch.randn(n, 2, generator=gen))

    parts = (LinearPath(), make_time_sampler("uniform"), make_coupling("independent"))
    plain, stable = CFM(*parts), CFM(*parts, stf=16, reference=Data().sample)
    batch = Batch(torch.randn(8, 2))
    a, b = plain.draw(batch, torch.Generator().manual_seed(4)), stable.draw(batch, torch.Generator().manual_seed(4))
    assert a.reference is None and b.reference.x1.shape == (16, 2)
    for f in ("x0", "x1", "t"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    target = stable_target(LinearPath(), b.x0, b.x1, b.t, b.reference.x1)
    torch.testing.assert_close(stable.loss(model, b), target.pow(2).mean())


def test_meanflow_takes_the_stable_velocity_in_its_target_and_as_its_tangent():
    """MeanFlow's target ``v + h d/dt u`` along ``(v, 1, 0)``, with the stable target as ``v``:
    checked against the derivative written out for u(z, t, h) = z (1 + t)^2 + h z^2."""
    from flowmatch.objectives import MeanFlow, MeanFlowOptions

    class U(torch.nn.Module):
        def forward(self, z, t, label=None, h=None):
            return z * (1 + t[:, None]) ** 2 + h[:, None] * z.pow(2)

    class Data:
        def sample(self, n, gen):
            return Batch(torch.randn(n, 2, generator=gen))

    mf = MeanFlow(make_time_sampler("uniform"), make_coupling("independent"), MeanFlowOptions(share=0.5), stf=256,
                  reference=Data().sample)
    d = mf.draw(Batch(torch.randn(64, 2)), torch.Generator().manual_seed(5))
    assert d.reference.x1.shape == (256, 2) and (d.t_end > d.t).any() and (d.t_end == d.t).any()
    _, target = mf.target(U(), d)
    v = stable_target(LinearPath(), d.x0, d.x1, d.t, d.reference.x1)
    z, t, h = d.t[:, None] * d.x1 + (1 - d.t[:, None]) * d.x0, d.t[:, None], (d.t_end - d.t)[:, None]
    du_dt = v * (1 + t) ** 2 + 2 * h * z * v + 2 * z * (1 + t) - z.pow(2)  # along (v, 1, 0): h = t_end - t falls
    torch.testing.assert_close(target, v + h * du_dt)


def test_train_with_stf_is_reproducible_and_recorded(cli, tmp_path):
    runs = {}
    for name, extra in (("a", ["--stf", "64"]), ("b", ["--stf", "64"]), ("plain", ["--stf", "0"])):
        rc, _, err = cli("train", "--steps", "5", "--batch-size", "32", "--no-plots", "--out", tmp_path / name, *extra, *TINY)
        assert rc == 0, err
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["stf"] == 64
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["plain"][k]) for k in runs["a"])
    # a reflow student of it trains on the teacher's fixed pairs, whose target is their own
    rc, _, err = cli("reflow", tmp_path / "a", "--out", tmp_path / "rf", "--pairs", "64", "--steps", "3", "--batch-size", "32",
                     "--teacher-nfe", "2", "--no-plots", "--no-progress")
    assert rc == 0, err
    assert json.loads((tmp_path / "rf" / "config.json").read_text())["train"]["stf"] == 0


@pytest.mark.parametrize("argv", [["--objective", "shortcut"], ["--coupling", "ot"], ["--data", "digits"]])
def test_what_it_cannot_average_is_refused_before_anything_is_written(cli, tmp_path, argv):
    rc, _, err = cli("train", "--stf", "8", *argv, "--out", tmp_path / "run", *TINY)
    assert "--stf" in one_line_error(rc, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, stf, steps", [
    ([], 4096, 3500),  # the checkerboard: flow matching on vectors
    (["--data", "moons", "--steps", "100"], 4096, 100),  # steps given: kept, the target still the stable one
    (["--stf", "0"], 0, 4000),  # the plain target: its 4000 steps
    (["--stf", "64"], 64, 4000),  # a count given: the base steps
    (["--objective", "meanflow"], 0, 5000),  # MeanFlow's recipe on vectors
    (["--objective", "shortcut"], 0, 4000),
    (["--coupling", "ot"], 0, 4000),
    (["--data", "digits"], 0, 9000),  # images: their own defaults, the plain target
    (["--data", "TABLE"], 0, 4000),  # a user's table: the plain target (its references would be the table's rows)
    (["--data", "TABLE", "--stf", "256"], 256, 4000),  # unless asked for
    (["--data", "TABLE", "--cond-columns", "2"], 0, 4000),  # continuous conditions
])
def test_train_defaults_to_the_stable_target_on_the_toys(cli, tmp_path, argv, stf, steps):
    """flowmatch train trains flow matching on the 2-D toys with --stf 4096 for 3500 steps (the plain
    target's 4000 steps' minutes); on tables, images, with conditions or a stable target of the
    user's own size, the plain target's steps."""
    table = tmp_path / "t.npy"
    np.save(table, np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32))
    argv = [str(table) if a == "TABLE" else a for a in argv]
    rc, out, err = cli("train", *argv, "--print-config")
    assert rc == 0, err
    settings = tomllib.loads(out)
    assert (settings["stf"], settings["steps"]) == (stf, steps), argv
