"""The library API for a loop of your own: the top-level exports, one call for a training example
(against its definition), one convention for randomness, the small interfaces a user's class
implements, and the rules the code keeps (short signatures, no command-line options in library
messages)."""

import ast
import re
from pathlib import Path

import pytest
import torch

import flowmatch as fm

SRC = Path(fm.__file__).parent


def test_every_exported_name_resolves_and_star_import_works():
    for name in fm.__all__:
        assert getattr(fm, name) is not None, name
    namespace = {}
    exec("from flowmatch import *", namespace)
    assert {"CFM", "MeanFlow", "integrate", "flow_map", "log_prob", "load", "OTCoupling", "MLP"} <= set(namespace)
    with pytest.raises(AttributeError):
        fm.no_such_name  # noqa: B018
    import importlib

    assert fm.reflow is importlib.import_module("flowmatch.reflow") and callable(fm.reflow.reflow)  # the module


def test_cfm_sample_is_the_straight_path_of_its_draws():
    """torchcfm's ``sample_location_and_conditional_flow`` for the article's choices: x0 ~ N(0, I),
    t ~ U[0, 1], x_t = t x1 + (1 - t) x0, u_t = x1 - x0, drawn in that order from the generator."""
    x1 = torch.randn(64, 3)
    s = fm.CFM().sample(x1, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(64, 3, generator=g)
    t = torch.rand(64, generator=g)
    torch.testing.assert_close(s.x0, x0)
    torch.testing.assert_close(s.t, t)
    torch.testing.assert_close(s.x_t, t[:, None] * x1 + (1 - t[:, None]) * x0)
    torch.testing.assert_close(s.u_t, x1 - x0)


def test_ot_cfm_pairs_each_data_row_with_the_noise_row_of_the_optimal_assignment():
    from helpers import optimal_assignment

    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(32, 2, generator=g) + 3, torch.randn(32, 2, generator=g)
    s = fm.CFM(coupling=fm.OTCoupling()).sample(x1, x0=x0, generator=g)
    cols, _ = optimal_assignment(x1, x0)  # for each data row, its noise row
    torch.testing.assert_close(s.x1, x1)  # data rows kept, noise rows re-paired
    torch.testing.assert_close(s.x0, x0[torch.as_tensor(cols)])
    assert ((s.x1 - s.x0) ** 2).sum() < ((x1 - x0) ** 2).sum()


def test_without_a_generator_draws_come_from_torchs_global_one():
    x1 = torch.randn(16, 2)
    torch.manual_seed(3)
    a = fm.CFM(time_sampler=fm.LogitNormalTime(0.4, 1.0)).sample(x1)
    torch.manual_seed(3)
    b = fm.CFM(time_sampler=fm.LogitNormalTime(0.4, 1.0)).sample(x1)
    torch.testing.assert_close(a.x_t, b.x_t)
    torch.testing.assert_close(fm.checkerboard(5, generator=torch.Generator().manual_seed(1)),
                               fm.checkerboard(5, torch.Generator().manual_seed(1)))


class SquaredTimes:
    """A user's time sampler: more weight near the noise."""

    def sample(self, n, generator=None, device=None):
        return torch.rand(n, generator=generator, device=device) ** 2


class ReversedCoupling:
    """A user's coupling: data rows in reverse order."""

    def pair(self, x0, x1, generator=None, labels=None):
        return x0, x1.flip(0), None if labels is None else labels.flip(0)


class QuadraticPath:
    """A user's path: x_t = t^2 x1 + (1 - t^2) x0."""

    def sample(self, x0, x1, t):
        w = t[:, None] ** 2
        return fm.PathSample(x_t=w * x1 + (1 - w) * x0, u_t=2 * t[:, None] * (x1 - x0), t=t, x0=x0, x1=x1)


def test_a_users_path_time_sampler_and_coupling_plug_into_the_objective():
    assert isinstance(SquaredTimes(), fm.TimeSampler) and isinstance(ReversedCoupling(), fm.Coupling)
    assert isinstance(QuadraticPath(), fm.Path)
    for cls in (fm.UniformTime, fm.UShapedTime):
        assert isinstance(cls(), fm.TimeSampler)
    assert isinstance(fm.OTCoupling(), fm.Coupling) and isinstance(fm.LinearPath(), fm.Path)
    x1, x0 = torch.randn(50, 2), torch.randn(50, 2)
    cfm = fm.CFM(path=QuadraticPath(), time_sampler=SquaredTimes(), coupling=ReversedCoupling())
    s = cfm.sample(x1, x0=x0, generator=torch.Generator().manual_seed(0))
    t = torch.rand(50, generator=torch.Generator().manual_seed(0)) ** 2
    torch.testing.assert_close(s.t, t)
    torch.testing.assert_close(s.x_t, t[:, None] ** 2 * x1.flip(0) + (1 - t[:, None] ** 2) * x0)
    model = fm.MLP(2, width=16, depth=1)
    loss = fm.cfm_loss(model, QuadraticPath(), s.x0, s.x1, s.t)
    loss.backward()
    assert torch.isfinite(loss) and model.out.weight.grad.abs().sum() > 0


def test_flow_map_takes_a_networks_jumps_over_its_grid():
    """u(z, t, h) = (c - z) / (1 - t) jumps to c from anywhere: one step lands on c exactly."""
    c = torch.tensor([2.0, -1.0])
    u = lambda z, t, h: (c - z) / (1 - t[:, None])  # noqa: E731
    x0 = torch.randn(10, 2)
    torch.testing.assert_close(fm.flow_map(u, x0, steps=1).x, c.expand(10, 2))
    res = fm.flow_map(u, x0, steps=4, trajectory=True)
    assert res.nfe == 4 and res.trajectory.shape == (5, 10, 2)
    torch.testing.assert_close(res.x, c.expand(10, 2))


# --- rules the code keeps ---------------------------------------------------------------------------

def _functions():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def _typer_command(node) -> bool:
    return any(isinstance(d, ast.Call) and getattr(d.func, "attr", getattr(d.func, "id", None)) == "command"
               for d in node.decorator_list)


def test_no_function_outside_the_typer_commands_takes_more_than_eight_parameters():
    long = []
    for path, node in _functions():
        a = node.args
        names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs) if x.arg not in ("self", "cls")]
        if len(names) > 8 and not _typer_command(node):
            long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({len(names)})")
    assert not long, long


def test_no_library_message_names_a_command_line_option():
    """Library code names its own settings; only cli.py turns them into ``--options``."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            call = node.exc if isinstance(node, ast.Raise) else node if isinstance(node, ast.Call) else None
            if not isinstance(call, ast.Call):
                continue
            name = getattr(call.func, "id", getattr(call.func, "attr", ""))
            if isinstance(node, ast.Call) and name not in ("warn", "warning"):
                continue
            for sub in ast.walk(call):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and re.search(r"(^|[\s(`'])--[a-z]", sub.value):
                    found.append(f"{path.relative_to(SRC)}:{sub.lineno} {sub.value[:60]!r}")
    assert not found, found
