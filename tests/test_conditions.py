"""Continuous conditions: a condition vector per row (a table's ``--cond-columns``, an .npz's
``cond``), classifier-free guidance with a null condition, ``sample --cond``.

The reference: data ``x | c ~ N(mu(c), 0.25^2 I)`` with ``mu(c) = (c, -c/2)`` and ``c ~ U[-2, 2]``.
A run trained on it must put its samples for a given ``c`` around ``mu(c)`` with spread 0.25, and
at guidance 0 (the null condition) reproduce the marginal over ``c``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowmatch.errors import UserError

from helpers import one_line_error

SPREAD = 0.25


def mu(c):
    c = np.asarray(c, dtype=np.float64)
    return np.stack([c, -0.5 * c], -1)


def conditional_gaussians(n=4000, seed=0):
    g = np.random.default_rng(seed)
    c = g.uniform(-2, 2, n)
    return mu(c) + SPREAD * g.standard_normal((n, 2)), c


FAST = ["--steps", "1000", "--batch-size", "256", "--width", "128", "--depth", "3", "--no-plots", "--no-progress"]


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A run trained on a table whose third column is the condition."""
    from flowmatch.cli import run

    d = tmp_path_factory.mktemp("cond")
    x, c = conditional_gaussians()
    np.savetxt(d / "t.csv", np.column_stack([x, c]), delimiter=",", header="a,b,c", comments="")
    assert run(["train", "--data", str(d / "t.csv"), "--cond-columns", "2", *FAST, "--out", str(d / "run")]) == 0
    return d / "run"


def test_the_condition_fixes_the_gaussian_mean(cond_run):
    from flowmatch.runs import load_run

    r = load_run(cond_run, device="cpu")
    assert r.cond_dim == 1 and json.loads((cond_run / "config.json").read_text())["cond_dim"] == 1
    for c in (-1.5, 0.0, 1.5):
        s = r.sample(2000, nfe=50, seed=1, cond=[c]).numpy()
        assert np.abs(s.mean(0) - mu(c)).max() < 0.08, (c, s.mean(0))
        assert np.abs(s.std(0) - SPREAD).max() < 0.05, (c, s.std(0))
    # one condition per sample: each sample follows its own row
    cs = np.repeat([-1.0, 1.0], 1000)[:, None]
    s = r.sample(2000, nfe=50, seed=2, cond=cs).numpy()
    assert np.abs(s[:1000].mean(0) - mu(-1.0)).max() < 0.08
    assert np.abs(s[1000:].mean(0) - mu(1.0)).max() < 0.08


def test_guidance_zero_is_the_null_condition_the_marginal(cond_run):
    """At w = 0 guidance leaves only the null condition's field: the marginal over c, whose
    first coordinate has mean 0 and variance 4/3 + 0.25^2 (c ~ U[-2, 2] plus the spread)."""
    from flowmatch.runs import load_run

    r = load_run(cond_run, device="cpu")
    s = r.sample(4000, nfe=50, seed=3, cond=[1.5], guidance=0.0).numpy()
    assert abs(s[:, 0].mean()) < 0.1
    assert abs(s[:, 0].std() - np.sqrt(4 / 3 + SPREAD**2)) < 0.1
    unconditional = r.sample(4000, nfe=50, seed=3).numpy()  # no --cond: the null condition too
    np.testing.assert_allclose(unconditional, s, atol=1e-4)


def test_sample_cond_from_a_file_on_the_command_line(cli, cond_run, tmp_path):
    np.save(tmp_path / "c.npy", np.array([1.0], dtype=np.float32))
    rc, _, err = cli("sample", cond_run, "--cond", tmp_path / "c.npy", "--n", "1000", "--nfe", "50",
                     "--no-progress", "--out", tmp_path / "s.npy")
    assert rc == 0, err
    s = np.load(tmp_path / "s.npy")
    assert np.abs(s.mean(0) - mu(1.0)).max() < 0.1


def test_an_npz_with_x_and_cond_trains_a_conditional_run(cli, tmp_path):
    x, c = conditional_gaussians(2000, seed=4)
    np.savez(tmp_path / "d.npz", x=x, cond=c)
    rc, _, err = cli("train", "--data", tmp_path / "d.npz", "--steps", "5", "--width", "32", "--depth", "2",
                     "--no-plots", "--no-progress", "--out", tmp_path / "run")
    assert rc == 0, err
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert doc["cond_dim"] == 1 and doc["shape"] == [2]
    from flowmatch.data import split_rows

    train, _ = split_rows(len(c), 0.1, "d.npz")  # the conditions are standardised by the training rows'
    np.testing.assert_allclose(doc["data"]["cond_mean"], [c[train.numpy()].mean()], rtol=1e-5)
    np.testing.assert_allclose(doc["data"]["cond_std"], [c[train.numpy()].std(ddof=1)], rtol=1e-5)
    from flowmatch.runs import load_run

    r = load_run(tmp_path / "run", device="cpu")
    assert r.sample(10, nfe=2, cond=[0.5]).shape == (10, 2)


def test_condition_embedding_uses_the_null_vector_for_nan_rows():
    from flowmatch.models.cond import CondEmbedding, null_condition
    from flowmatch.solvers import guided

    emb = CondEmbedding(3, 8)
    with torch.no_grad():
        emb.null.copy_(torch.arange(8.0))
    c = torch.tensor([[0.1, 0.2, 0.3], [float("nan")] * 3])
    out = emb(c, 2, torch.float32)
    torch.testing.assert_close(out[1], emb.null)
    torch.testing.assert_close(out[0], emb.proj(c[:1])[0])
    torch.testing.assert_close(emb(None, 2, torch.float32), emb.null.expand(2, -1))
    assert torch.isnan(null_condition(c)).all() and (null_condition(torch.tensor([3, 4])) == -1).all()

    seen = []

    def v(x, t, label):
        seen.append(label)
        return torch.where(torch.isnan(label).any(1, keepdim=True), torch.zeros_like(x), torch.ones_like(x))

    x = torch.zeros(2, 2)
    torch.testing.assert_close(guided(v, c[:1].expand(2, -1), 3.0)(x, torch.zeros(2)), torch.full((2, 2), 3.0))
    assert torch.isnan(seen[0][2:]).all() and not torch.isnan(seen[0][:2]).any()


def test_bad_conditions_are_one_line_errors(cli, cond_run, tiny_run, tmp_path):
    x, c = conditional_gaussians(100)
    np.savetxt(tmp_path / "t.csv", np.column_stack([x, c]), delimiter=",")
    cases = [
        (["train", "--data", tmp_path / "t.csv", "--cond-columns", "3"], "--cond-columns"),
        (["train", "--data", tmp_path / "t.csv", "--cond-columns", "0,1,2"], "--cond-columns"),
        (["train", "--data", tmp_path / "t.csv", "--cond-columns", "a"], "--cond-columns"),
        (["train", "--data", "checkerboard", "--cond-columns", "0"], "--cond-columns"),
        (["train", "--data", tmp_path / "t.csv", "--cond-columns", "2", "--coupling", "ot", "--ot-by-class"], "--ot-by-class"),
    ]
    np.savez(tmp_path / "bad.npz", x=x, cond=c[:50])
    cases.append((["train", "--data", tmp_path / "bad.npz"], "bad.npz"))
    np.save(tmp_path / "c2.npy", np.zeros(2, dtype=np.float32))
    np.save(tmp_path / "c1.npy", np.zeros(1, dtype=np.float32))
    np.save(tmp_path / "cnan.npy", np.array([np.nan], dtype=np.float32))
    cases += [
        (["sample", cond_run, "--cond", tmp_path / "c2.npy"], "--cond"),  # 2 values, the run takes 1
        (["sample", cond_run, "--cond", tmp_path / "cnan.npy"], "--cond"),
        (["sample", cond_run, "--cond", tmp_path / "missing.npy"], "--cond"),
        (["sample", cond_run, "--label", "1"], "--label"),
        (["sample", cond_run, "--guidance", "2"], "--cond"),
        (["sample", tiny_run, "--cond", tmp_path / "c1.npy"], "--cond"),  # an unconditional run
    ]
    for args, option in cases:
        out = tmp_path / "out"
        extra = ["--out", out] if args[0] == "train" else ["--out", tmp_path / "s.npy", "--n", "10"]
        rc, _, err = cli(*args, *extra)
        assert option in one_line_error(rc, err), (args, err)
        assert not out.exists() and not (tmp_path / "s.npy").exists()


@given(width=st.integers(2, 6), data=st.data())
def test_cond_columns_split_a_table_into_data_and_conditions(tmp_path_factory, width, data):
    """Any set of condition columns that leaves a data column: the two parts, put back in
    their columns, are the table; a set that leaves none, or names a missing column, is refused."""
    from flowmatch.data.arrays import load_table, parse_columns

    cols = data.draw(st.lists(st.integers(0, width), unique=True, min_size=1, max_size=width))
    table = np.arange(5 * width, dtype=np.float32).reshape(5, width)
    path = tmp_path_factory.mktemp("t") / "t.npy"
    np.save(path, table)
    columns = parse_columns(",".join(map(str, cols)))
    assert columns == cols
    if max(cols) >= width or len(cols) >= width:
        with pytest.raises(UserError, match="cond_columns"):
            load_table(str(path), columns)
        return
    x, c = load_table(str(path), columns)
    keep = [k for k in range(width) if k not in cols]
    np.testing.assert_array_equal(x.numpy(), table[:, keep])
    np.testing.assert_array_equal(c.numpy(), table[:, cols])
