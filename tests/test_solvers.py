import math

import pytest
import torch

from flowmatch.errors import UserError
from flowmatch.solvers import ADAPTIVE_METHODS, FIXED_METHODS, METHODS, SDE_METHODS, integrate

from problems import PROBLEMS, TimeOnly


def _x0(n=16, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("method", list(FIXED_METHODS))
def test_fixed_methods_converge_at_their_order(method, name):
    prob, x0 = PROBLEMS[name], _x0()
    per, order = FIXED_METHODS[method][1], FIXED_METHODS[method][2]
    exact = prob.exact(x0)
    errs = []
    for steps in (8, 16, 32):
        res = integrate(prob.v, x0, method, steps * per)
        errs.append((res.x - exact).abs().max().item())
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    for r in rates:
        assert order - 0.3 < r < order + 0.6, (method, errs, rates)
    assert errs[-1] < 10 * 32.0 ** (-order)  # error constant of order one


@pytest.mark.parametrize("method", list(FIXED_METHODS))
def test_nfe_is_counted_exactly(method):
    calls = [0]

    def v(x, t):
        calls[0] += 1
        assert t.shape == (x.shape[0],)
        return -x

    per = FIXED_METHODS[method][1]
    res = integrate(v, _x0(), method, 12 * per)
    assert res.nfe == calls[0] == 12 * per


def test_euler_uses_the_grid_k_over_K():
    prob, x0 = TimeOnly(), _x0()
    for K in (1, 4, 10):
        res = integrate(prob.v, x0, "euler", K)
        torch.testing.assert_close(res.x, x0 + (K - 1) / (2 * K))


def test_every_solver_is_tested():
    """The two parametrised tests below cover every method :func:`integrate` accepts; the
    stochastic ones (:func:`~flowmatch.solvers.integrate_sde`) are tested in test_sde.py."""
    assert sorted(METHODS) == sorted([*FIXED_METHODS, *ADAPTIVE_METHODS, *SDE_METHODS])
    assert list(SDE_METHODS) == ["euler-maruyama"]


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("method", list(ADAPTIVE_METHODS))
def test_adaptive_methods_meet_their_tolerance_and_report_nfe(method, name):
    prob, x0 = PROBLEMS[name], _x0()
    exact = prob.exact(x0)
    nfes = []
    # the global error of a well-conditioned problem over [0, 1] stays within a small multiple
    # of the local tolerance (measured: at most 6.9x, bosh3 on the rotation)
    for tol in (1e-6, 1e-9):
        calls = [0]

        def v(x, t, calls=calls):
            calls[0] += 1
            return prob.v(x, t)

        res = integrate(v, x0, method, None, tol=tol)
        err = (res.x - exact).abs().max().item()
        assert err < 10 * tol, (method, tol, err, res.nfe)
        assert res.nfe == calls[0] > 10
        nfes.append(res.nfe)
    loose = integrate(prob.v, x0, method, None, tol=1e-3)
    assert loose.nfe < nfes[0] < nfes[1]


def test_trajectories_have_grid_times():
    prob, x0 = PROBLEMS["rotation"], _x0()
    res = integrate(prob.v, x0, "midpoint", 8, trajectory=True)
    assert res.trajectory.shape == (5, *x0.shape)
    torch.testing.assert_close(res.times, torch.linspace(0, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(res.trajectory[0], x0)
    torch.testing.assert_close(res.trajectory[-1], res.x)
    ad = integrate(prob.v, x0, "dopri5", None, trajectory=11)
    assert ad.trajectory.shape == (11, *x0.shape)


def test_backwards_integration_inverts_forwards():
    prob, x0 = PROBLEMS["linear-decay"], _x0()
    fwd = integrate(prob.v, x0, "dopri5", None, tol=1e-10)
    back = integrate(prob.v, fwd.x, "dopri5", None, tol=1e-10, span=(1.0, 0.0))
    torch.testing.assert_close(back.x, x0, atol=1e-7, rtol=0)


def test_bad_solver_choices_raise_user_errors():
    with pytest.raises(UserError, match=", ".join(METHODS)):
        integrate(lambda x, t: x, _x0(), "leapfrog", 4)
    with pytest.raises(UserError, match="multiple of 4"):
        integrate(lambda x, t: x, _x0(), "rk4", 6)
    with pytest.raises(UserError, match="positive integer"):
        integrate(lambda x, t: x, _x0(), "euler", 0)


def test_an_adaptive_solve_that_cannot_finish_is_a_user_error(monkeypatch):
    """A tolerance the arithmetic cannot resolve is refused up front; a solve that needs more
    steps than the cap stops with a message naming --tol instead of crawling for hours."""
    import flowmatch.solvers

    x0 = torch.ones(4, 2)
    with pytest.raises(UserError, match="tol: 1e-08 is below what float32"):
        integrate(lambda x, t: -x, x0, "dopri5", None, tol=1e-8)
    monkeypatch.setattr(flowmatch.solvers, "MAX_ADAPTIVE_STEPS", 20)
    stiff = lambda x, t: -1e4 * (x - torch.cos(t)[:, None])  # noqa: E731
    with pytest.raises(UserError, match="tol: dopri5 could not meet tolerance"):
        integrate(stiff, x0.double(), "dopri5", None, tol=1e-9)
    integrate(lambda x, t: -x, x0.double(), "dopri5", None, tol=1e-9)  # an easy one still finishes
