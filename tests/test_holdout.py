"""Held-out rows of user data (eval and nll never measure on training rows), and the OT
coupling's options reachable from the command line."""

import json

import numpy as np
import pytest
import torch

from flowmatch.config import TrainConfig
from flowmatch.couplings import OTCoupling
from flowmatch.data import make_dataset, spec_from_arg
from flowmatch.runs import load_run

from helpers import TINY, image_folder, one_line_error


def _rows_as_set(x):
    return {tuple(r) for r in np.round(x.numpy().astype(np.float64), 5).tolist()}


def _all_among(a, b):
    """Every row of ``a`` is (to float32 rounding) a row of ``b``."""
    return bool((torch.cdist(a.double(), b.double()).min(1).values < 1e-3).all())


def test_a_table_holds_out_a_fixed_tenth_that_never_trains(tmp_path):
    arr = np.random.default_rng(0).normal(size=(200, 3)) * [1, 10, 100]
    np.save(tmp_path / "t.npy", arr)
    ds = make_dataset(spec_from_arg(str(tmp_path / "t.npy")))
    assert ds.spec["holdout"] == 0.1
    train, held = _rows_as_set(ds.data), _rows_as_set(ds.held)
    assert len(train) == 180 and len(held) == 20 and not train & held
    assert train | held == _rows_as_set(torch.from_numpy(arr).float())
    # training batches come from the training rows only; references from the held-out rows only
    g = torch.Generator().manual_seed(0)
    assert _all_among(ds.decode(ds.sample(4000, g).x1), ds.data)
    assert _rows_as_set(ds.reference(4000, g)) == held
    # the standardisation is the training rows'
    torch.testing.assert_close(ds.mean, ds.data.double().mean(0).float())
    # the split is a property of the file: a rebuilt dataset (eval, another seed) has the same one
    again = make_dataset(ds.spec)
    assert _rows_as_set(again.reference(4000, g)) == held


def test_holdout_zero_and_runs_written_before_the_split_use_every_row(tmp_path):
    arr = np.random.default_rng(1).normal(size=(50, 2))
    np.save(tmp_path / "t.npy", arr)
    for spec in (spec_from_arg(str(tmp_path / "t.npy"), holdout=0.0),
                 {"name": "array", "path": str(tmp_path / "t.npy")}):  # an old config.json's spec
        ds = make_dataset(spec)
        assert len(ds.data) == 50 and _rows_as_set(ds.reference(2000, torch.Generator())) == _rows_as_set(ds.data)


def test_a_table_too_small_to_hold_out_warns_and_measures_on_its_rows(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(10.0).reshape(5, 2))
    with pytest.warns(UserWarning, match="too few to hold out"):
        ds = make_dataset(spec_from_arg(str(tmp_path / "t.npy")))
    assert len(ds.data) == 5 and len(ds.held) == 5


def test_image_folders_and_arrays_hold_out_images(tmp_path):
    rng = np.random.default_rng(0)
    root = image_folder(tmp_path / "imgs", per_class=10)
    ds = make_dataset(spec_from_arg(str(root), image_size=8))
    ds._data()
    assert len(ds.train_rows) == 18 and len(ds.held_rows) == 2 and len(ds.labels) == 20
    train, held = ds.pixels.rows(ds.train_rows), ds.pixels.rows(ds.held_rows)
    assert not {tuple(v) for v in train.reshape(18, -1).tolist()} & {tuple(v) for v in held.reshape(2, -1).tolist()}
    np.save(tmp_path / "im.npy", rng.random((30, 1, 4, 4)).astype(np.float32))
    arr = make_dataset(spec_from_arg(str(tmp_path / "im.npy")))
    arr._data()
    assert len(arr.train_rows) == 27 and len(arr.held_rows) == 3 and not set(arr.train_rows) & set(arr.held_rows)


def test_eval_and_nll_of_a_table_run_measure_held_out_rows(cli, tmp_path):
    arr = np.random.default_rng(2).normal(size=(300, 2))
    np.save(tmp_path / "t.npy", arr)
    run = tmp_path / "run"
    rc, _, err = cli("train", "--data", tmp_path / "t.npy", "--steps", "20", "--out", run, "--no-plots", *TINY)
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["data"]["holdout"] == 0.1
    r = load_run(run)
    drawn = _rows_as_set(r.dataset.reference(1000, torch.Generator()))  # what eval and nll compare with
    assert drawn == _rows_as_set(r.dataset.held) and len(drawn) == 30
    assert not drawn & _rows_as_set(r.dataset.data)


def test_holdout_out_of_range_is_refused(cli, tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((20, 2)))
    rc, _, err = cli("train", "--data", tmp_path / "t.npy", "--holdout", "0.9", "--out", tmp_path / "r", *TINY)
    assert "--holdout" in one_line_error(rc, err) and not (tmp_path / "r").exists()


def test_ot_options_reach_the_coupling_from_the_command_line(cli, tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli("train", "--coupling", "ot", "--ot-method", "sinkhorn", "--ot-reg", "0.1", "--ot-by-class",
                     "--steps", "6", "--batch-size", "64", "--out", run, "--no-plots", *TINY)
    assert rc == 0, err
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text())["train"])
    coupling = cfg.build_coupling()
    assert isinstance(coupling, OTCoupling)
    assert (coupling.method, coupling.reg, coupling.by_class) == ("sinkhorn", 0.1, True)
    for option, value in (("--ot-method", "greedy"), ("--ot-reg", "0")):
        rc, _, err = cli("train", "--coupling", "ot", option, value, "--out", tmp_path / "bad", *TINY)
        assert option in one_line_error(rc, err) and not (tmp_path / "bad").exists()
