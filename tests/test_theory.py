"""The theory of the article, checked numerically.

For data uniform on a finite set, the straight path's marginal field has a closed form
(``flowmatch.paths.marginal_velocity``). We check that (a) the conditional and marginal
flow-matching losses have the same gradient, (b) integrating the exact field carries
Gaussian noise onto the data points, (c) a trained network's field approaches it.
"""

import pytest
import torch

from flowmatch.models import MLP
from flowmatch.paths import LinearPath, marginal_velocity
from flowmatch.solvers import integrate
from flowmatch.training import cfm_loss

PATH = LinearPath()


def _data(n=6, seed=0, scale=2.0):
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _draw(data, b, g, t_max=0.9):
    x1 = data[torch.randint(len(data), (b,), generator=g)]
    x0 = torch.randn(b, 2, generator=g, dtype=torch.float64)
    t = t_max * torch.rand(b, generator=g, dtype=torch.float64)
    return x0, x1, t


def _grad(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


def _gradient_differences(model, data, target_scale=1.0, batches=48, b=256, seed=0):
    """Per batch: grad(conditional loss) - grad(marginal loss), on the same x_t."""
    g = torch.Generator().manual_seed(seed)
    conds, diffs = [], []
    for _ in range(batches):
        x0, x1, t = _draw(data, b, g)
        s = PATH.sample(x0, x1, t)
        g_cond = _grad(model, ((model(s.x_t, t) - s.u_t) ** 2).sum(1).mean())
        v_star = target_scale * marginal_velocity(PATH, s.x_t, t, data)
        g_marg = _grad(model, ((model(s.x_t, t) - v_star) ** 2).sum(1).mean())
        conds.append(g_cond)
        diffs.append(g_cond - g_marg)
    return torch.stack(conds), torch.stack(diffs)


def _z(values):
    """Mean over batches in units of its standard error."""
    return (values.mean() / (values.std() / len(values) ** 0.5)).item()


def test_conditional_and_marginal_losses_have_the_same_gradient():
    torch.manual_seed(0)
    model = MLP(2, width=32, depth=2, time_scale=10.0).double()
    data = _data()
    conds, diffs = _gradient_differences(model, data)
    g = torch.Generator().manual_seed(1)
    directions = [conds.mean(0)] + [torch.randn(conds.shape[1], generator=g, dtype=torch.float64) for _ in range(3)]
    for u in directions:
        u = u / u.norm()
        assert abs(_z(diffs @ u)) < 4.0
    # the gradient itself is far from zero in that measure, so the check has power...
    u = conds.mean(0) / conds.mean(0).norm()
    assert _z(conds @ u) > 20
    # ...and a wrong marginal field (scaled by 0.8) is detected
    _, wrong = _gradient_differences(model, data, target_scale=0.8)
    assert abs(_z(wrong @ u)) > 6


def test_exact_field_carries_noise_onto_the_data_points():
    data = _data(n=8, seed=2, scale=2.5)
    x0 = torch.randn(400, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t_end = 1 - 1e-3
    res = integrate(lambda x, t: marginal_velocity(PATH, x, t, data), x0, "dopri5", None,
                    tol=1e-7, span=(0.0, t_end))
    d = torch.cdist(res.x, data)
    nearest = d.min(dim=1)
    # at t = 1 - eps every sample sits on a data point (up to eps times its noise)
    assert nearest.values.max() < 0.02
    # and each data point receives its share 1/8 (chi-square, 7 dof, 99.9%: 24.3)
    counts = torch.bincount(nearest.indices, minlength=8).double()
    chi2 = ((counts - 50) ** 2 / 50).sum().item()
    assert chi2 < 24.3


@pytest.fixture(scope="module")
def trained():
    data = _data(n=5, seed=4, scale=2.0).float()
    torch.manual_seed(0)
    model = MLP(2, width=128, depth=3)
    init = MLP(2, width=128, depth=3)
    init.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(5)
    steps = 2500
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    for _ in range(steps):
        x0, x1, t = (a.float() for a in _draw(data.double(), 256, g, t_max=1.0))
        loss = cfm_loss(model, PATH, x0, x1, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return data, init, model


def test_trained_field_approaches_the_exact_field(trained):
    data, init, model = trained
    g = torch.Generator().manual_seed(6)
    x0, x1, t = (a.float() for a in _draw(data.double(), 4000, g, t_max=0.8))
    x = PATH.sample(x0, x1, t).x_t
    exact = marginal_velocity(PATH, x, t, data)
    with torch.no_grad():
        err = ((model(x, t) - exact) ** 2).sum(1).mean() / (exact**2).sum(1).mean()
        err0 = ((init(x, t) - exact) ** 2).sum(1).mean() / (exact**2).sum(1).mean()
    assert err < 0.05
    assert err < 0.05 * err0


def test_conditional_loss_is_marginal_loss_plus_a_constant(trained):
    """E||v - u||^2 = E||v - v*||^2 + E||v* - u||^2 for any v: the two losses differ by a constant."""
    data, init, model = trained
    g = torch.Generator().manual_seed(7)
    x0, x1, t = _draw(data.double(), 20000, g, t_max=0.8)
    s = PATH.sample(x0, x1, t)
    exact = marginal_velocity(PATH, s.x_t, t, data.double())
    const = ((exact - s.u_t) ** 2).sum(1)
    with torch.no_grad():
        for net in (init, model):
            v = net(s.x_t.float(), t.float()).double()
            lhs = ((v - s.u_t) ** 2).sum(1)
            rhs = ((v - exact) ** 2).sum(1) + const
            d = lhs - rhs
            assert abs(d.mean()) < 4 * d.std() / len(d) ** 0.5
