"""The command line's contract for bad input, case by case: one line on stderr naming the file
or option, exit status 2, nothing written or overwritten; an internal failure exits 1.
(tests/test_fuzz.py checks the same contract on generated input.)"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, TRAIN_TINY, copy_run, one_line_error

TRAIN = TRAIN_TINY


def _tree(path):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).rglob("*") if p.is_file()}


# --- numbers -------------------------------------------------------------------------------

FLOATS = [
    ("train", "--lr"), ("train", "--sigma-min"), ("train", "--grad-clip"), ("train", "--time-std"),
    ("sample", "--guidance"), ("sample", "--tol"), ("eval", "--tol"), ("nll", "--tol"), ("reflow", "--lr"),
    ("distill", "--tol"),
]


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
@pytest.mark.parametrize("command,option", FLOATS, ids=lambda x: x if isinstance(x, str) else None)
def test_float_options_must_be_finite(cli, tiny_run, tmp_path, command, option, value):
    out = tmp_path / "out"
    args = {"train": ["--out", out, *TRAIN], "sample": [tiny_run, "--out", tmp_path / "x.npy"],
            "eval": [tiny_run], "nll": [tiny_run], "reflow": [tiny_run, "--out", out],
            "distill": [tiny_run, "--out", out]}[command]
    rc, _, err = cli(command, *args, option, value)
    assert option in one_line_error(rc, err)
    assert not out.exists() and not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("tol", ["0", "-1", "nan", "1e-14"])  # 1e-14: float32 cannot resolve it (it crawled)
@pytest.mark.parametrize("command", ["sample", "eval", "nll", "reflow", "distill"])
def test_tolerance_must_be_positive(cli, tiny_run, tmp_path, command, tol):
    out = tmp_path / "student"
    args = {"sample": ["--out", tmp_path / "x.npy"], "eval": [], "nll": [],
            "reflow": ["--out", out, "--pairs", "8"], "distill": ["--out", out, "--pairs", "8"]}[command]
    rc, _, err = cli(command, tiny_run, *args, "--tol", tol)
    assert "--tol" in one_line_error(rc, err)
    assert not out.exists() and not (tmp_path / "x.npy").exists()  # reflow: no pairs.json left behind


def test_odd_width_is_refused(cli, tmp_path):
    rc, _, err = cli("train", "--out", tmp_path / "run", *TRAIN, "--width", "33")
    assert "--width" in one_line_error(rc, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("hw", [(8, 9), (7, 7), (16, 18)])
def test_images_the_unet_cannot_halve_are_refused(cli, tmp_path, hw):
    f = tmp_path / "img.npy"
    np.save(f, np.random.default_rng(0).random((6, 1, *hw)).astype(np.float32))
    rc, _, err = cli("train", "--data", f, "--out", tmp_path / "run", *TRAIN)
    line = one_line_error(rc, err)
    assert str(f) in line and f"{hw[0]}x{hw[1]}" in line
    assert not (tmp_path / "run").exists()


def test_divergence_before_a_checkpoint_leaves_nothing(cli, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli("train", "--out", out, "--steps", "30", "--lr", "1e30", "--log-every", "5", *TINY)
    line = one_line_error(rc, err)
    assert "diverged" in line and "no checkpoint" in line and "kept" not in line.split("no checkpoint")[0]
    assert not out.exists()
    rc, _, err = cli("train", "--out", out, "--steps", "2", *TINY, "--no-plots")  # --out is free again
    assert rc == 0, err


# --- labels and guidance -------------------------------------------------------------------

def test_guidance_needs_a_label(cli, tiny_run, tmp_path):
    rc, _, err = cli("sample", tiny_run, "--guidance", "3", "--out", tmp_path / "x.npy")
    line = one_line_error(rc, err)
    assert "--guidance" in line and "--label" in line
    assert not (tmp_path / "x.npy").exists()


# --- output files --------------------------------------------------------------------------

def test_sample_out_is_checked_before_sampling(cli, tiny_run, tmp_path):
    (tmp_path / "dir.npy").mkdir()
    for out, needle in ((tmp_path / "dir.npy", "directory"), (tmp_path / "missing" / "x.npy", "does not exist")):
        rc, _, err = cli("sample", tiny_run, "--out", out, "--n", "10")
        assert needle in one_line_error(rc, err)
    assert list((tmp_path / "dir.npy").iterdir()) == []


def test_one_overwrite_rule(cli, tiny_run, tmp_path):
    out = tmp_path / "x.npy"
    out.write_bytes(b"keep me")
    rc, _, err = cli("sample", tiny_run, "--out", out, "--n", "10", "--no-progress")
    assert "--overwrite" in one_line_error(rc, err)
    assert out.read_bytes() == b"keep me"
    rc, _, err = cli("sample", tiny_run, "--out", out, "--n", "10", "--no-progress", "--overwrite")
    assert rc == 0, err
    assert np.load(out).shape == (10, 2)
    plot = tmp_path / "q.png"
    plot.write_bytes(b"keep me")
    rc, _, err = cli("eval", tiny_run, "--plot", plot, "--n", "50", "--nfe", "1")
    assert "--overwrite" in one_line_error(rc, err)
    assert plot.read_bytes() == b"keep me"


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root writes anywhere")
def test_unwritable_folder(cli, tiny_run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = cli("sample", tiny_run, "--out", ro / "x.npy", "--n", "10")
        assert "not writable" in one_line_error(rc, err)
    finally:
        ro.chmod(0o700)


# --- run directories -----------------------------------------------------------------------

CONFIG_DAMAGE = {
    "num_classes-text": lambda c: c.update(num_classes="x"),
    "num_classes-negative": lambda c: c.update(num_classes=-1),
    "lineage-steps-text": lambda c: c["train"].update(lineage={"kind": "distill", "steps": "x"}),
    "width-negative": lambda c: c["train"].update(width=-6),
    "width-odd": lambda c: c["train"].update(width=33),
    "lr-infinite": lambda c: c["train"].update(lr=float("inf")),
    "shape-text": lambda c: c.update(shape="x"),
    "shape-wrong": lambda c: c.update(shape=[3]),
    "shape-missing": lambda c: c.pop("shape"),
    "data-missing": lambda c: c.pop("data"),
    "data-extra-key": lambda c: c["data"].update(colour="red"),
    "data-seed-text": lambda c: c["data"].update(seed="x"),
    "train-not-object": lambda c: c.update(train=[1, 2]),
}


@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
def test_malformed_config_names_config_json(cli, tiny_run, tmp_path, damage):
    run = copy_run(tiny_run, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    CONFIG_DAMAGE[damage](cfg)
    (run / "config.json").write_text(json.dumps(cfg))
    before = _tree(run)
    for args in (["sample", run, "--n", "10", "--out", tmp_path / "x.npy"], ["plot", run],
                 ["train", "--resume", "--out", run, "--no-progress"]):
        rc, _, err = cli(*args)
        assert "config.json" in one_line_error(rc, err), args
    assert not (tmp_path / "x.npy").exists()
    assert _tree(run) == before


def test_torn_last_metrics_line_is_skipped(cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 61, "lo')  # what SIGKILL during an append leaves
    rc, _, err = cli("plot", run)
    assert rc == 0, err
    rc, _, err = cli("train", "--resume", "--out", run, "--no-progress")
    assert rc == 0, err
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 60]


def test_torn_metrics_line_elsewhere_is_an_error_and_nothing_is_redrawn(cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0][:7] + "\n" + "\n".join(lines[1:]) + "\n")
    before = _tree(run)
    for args in (["plot", run], ["train", "--resume", "--out", run, "--no-progress"]):
        rc, _, err = cli(*args)
        assert "metrics.jsonl" in one_line_error(rc, err)
    assert _tree(run) == before


# --- resume --------------------------------------------------------------------------------

def test_resume_steps_is_the_new_total(cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    before = _tree(run)
    rc, _, err = cli("train", "--resume", "--out", run, "--steps", "40", "--no-progress")
    assert "--steps" in one_line_error(rc, err) and "60" in err
    assert _tree(run) == before
    rc, _, err = cli("train", "--resume", "--out", run, "--steps", "80", "--no-progress")
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 80
    assert torch.load(run / "trainer_state.pt", weights_only=True)["step"] == 80
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 60, 80]


def test_resume_refuses_settings_it_would_ignore(cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    before = _tree(run)
    for args in (["--lr", "5"], ["--data", "moons"], ["--width", "64"], ["--compile"]):
        rc, _, err = cli("train", "--resume", "--out", run, *args, "--no-progress")
        assert args[0] in one_line_error(rc, err) and "config.json" in err
        assert _tree(run) == before
    # the run's own command line with --resume added is accepted (it is complete: nothing to do)
    rc, _, err = cli("train", "--resume", "--out", run, "--steps", "60", "--batch-size", "128", *TINY)
    assert rc == 0, err


# --- launcher and messages -----------------------------------------------------------------

def _fake_torchrun(rc, message=None):
    def run(cmd, env=None, **kw):
        if message is not None:
            Path(env["FLOWMATCH_ERROR_DIR"], "rank-1").write_text(message)
        return rc, "E1129 08:06:38.520000 1 torch/distributed/elastic/multiprocessing/api.py:1] failed\n"

    return run


def test_a_crashed_process_exits_1_and_bad_input_2(cli, tmp_path, monkeypatch):
    import flowmatch.cli

    args = ("train", "--processes", "2", "--out", tmp_path / "run", *TRAIN)
    monkeypatch.setattr(flowmatch.cli, "_torchrun", _fake_torchrun(1))
    rc, _, err = cli(*args)
    assert rc == 1 and "Traceback" not in err
    monkeypatch.setattr(flowmatch.cli, "_torchrun", _fake_torchrun(1, "--data: something a process refused"))
    rc, _, err = cli(*args)
    assert "something a process refused" in one_line_error(rc, err)


def test_messages_name_only_options_that_exist():
    import typer.main

    from flowmatch.cli import app

    group = typer.main.get_command(app)
    options = {opt for cmd in group.commands.values() for p in cmd.params for opt in p.opts + p.secondary_opts}
    src = Path(__file__).parents[1] / "src" / "flowmatch"
    named = set()
    for f in src.rglob("*.py"):
        for msg in re.findall(r'UserError\(\s*f?"([^"]*)', f.read_text()):
            named |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", msg))
    assert named and named <= options, named - options


# --- eval on image runs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from flowmatch.cli import run

    out = tmp_path_factory.mktemp("img") / "run"
    assert run(["train", "--data", "digits", "--model", "mlp", "--out", str(out), *TRAIN]) == 0
    return out


def test_image_eval_honours_nfe_and_n(cli, image_run, monkeypatch):
    import flowmatch.image_metrics

    seen = {}

    def fake(run, **kw):
        seen.update(kw)
        return {"classifier": {"ratio": 1.0}, "pca": {"ratio": 1.0}, "prdc": {"precision": {"value": 1.0, "data": 1.0}}}

    monkeypatch.setattr(flowmatch.image_metrics, "evaluate_digits", fake)
    rc, _, err = cli("eval", image_run, "--nfe", "8", "--n", "4000", "--solver", "midpoint")
    assert rc == 0, err
    assert seen["nfe"] == 8 and seen["n"] == 4000 and seen["solver"] == "midpoint"


@pytest.mark.parametrize("args,option", [(["--tol", "1e-3"], "--tol"), (["--repeats", "2"], "--repeats"),
                                         (["--plot", "q.png"], "--plot"), (["--nfe", "1,2"], "--nfe")])
def test_image_eval_refuses_what_it_cannot_honour(cli, image_run, tmp_path, monkeypatch, args, option):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("eval", image_run, *args)
    assert option in one_line_error(rc, err)
    assert not (tmp_path / "q.png").exists()


def test_eval_refuses_an_adaptive_sweep_solver(cli, tiny_run):
    rc, _, err = cli("eval", tiny_run, "--solver", "dopri5")
    assert "--solver" in one_line_error(rc, err)


# --- one-column tables ---------------------------------------------------------------------

def test_one_column_tables_work_end_to_end(cli, tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("x\n" + "\n".join(str(v) for v in np.random.default_rng(0).normal(3.0, 2.0, 300)))
    run = tmp_path / "run"
    rc, _, err = cli("train", "--data", f, "--out", run, "--steps", "20", "--batch-size", "64", *TINY)
    assert rc == 0, err
    for name in ("samples.png", "trajectories.png", "loss.png", "flow.gif"):
        assert (run / name).is_file(), name
    rc, _, err = cli("sample", run, "--n", "50", "--nfe", "4", "--out", tmp_path / "x.npy", "--no-progress")
    assert rc == 0, err
    assert np.load(tmp_path / "x.npy").shape == (50, 1)
    rc, _, err = cli("sample", run, "--n", "50", "--nfe", "4", "--out", tmp_path / "x.png", "--no-progress")
    assert rc == 0, err
    rc, out, err = cli("eval", run, "--n", "50", "--nfe", "2", "--json", "--repeats", "1", "--tol", "1e-2")
    assert rc == 0, err
    # W2 in one dimension is the distance of the sorted samples (the monotone map is optimal)
    from flowmatch.runs import load_run

    r = load_run(run)
    from flowmatch.metrics import finite_rows

    ref, _ = finite_rows(r.dataset, 50)  # a table: its 30 different held-out rows, as many samples
    x = r.sample(len(ref), nfe=2, seed=0)
    assert len(ref) == 30 and json.loads(out)["n"] == 30
    exact = (x.double().flatten().sort().values - ref.double().flatten().sort().values).pow(2).mean().sqrt().item()
    assert json.loads(out)["nfe"]["2"]["w2"] == pytest.approx(exact, rel=1e-6)
    rc, _, err = cli("plot", run)
    assert rc == 0, err
