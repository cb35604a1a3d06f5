"""train --log-with tensorboard: accelerate's tracker writes event files that tensorboard's own
reader reads back: the same losses and learning rates as metrics.jsonl, gradient norms, and
sample pictures at checkpoints."""

from __future__ import annotations

import json
import math

import pytest

from helpers import TINY, one_line_error

pytest.importorskip("tensorboard", reason="flowmatch[track] is not installed")


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_what_metrics_jsonl_holds_and_samples(cli, tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli("train", "--steps", "40", "--log-every", "10", "--checkpoint-every", "20", "--batch-size", "64",
                     "--grad-clip", "0.5", "--log-with", "tensorboard", "--out", run, "--no-plots", *TINY)
    assert rc == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"step", "loss", "lr", "time"}  # metrics.jsonl stays as it was
    acc = events(run / "tracking")
    assert {"loss", "lr", "grad_norm"} <= set(acc.Tags()["scalars"])
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    lr = {e.step: e.value for e in acc.Scalars("lr")}
    assert sorted(loss) == [10, 20, 30, 40]
    for row in rows:
        assert loss[row["step"]] == pytest.approx(row["loss"], rel=1e-6)
        assert lr[row["step"]] == pytest.approx(row["lr"], rel=1e-6)
    norms = [e.value for e in acc.Scalars("grad_norm")]
    # the norm before clipping: above the clip threshold early in training
    assert all(math.isfinite(v) and v > 0 for v in norms) and max(norms) > 0.5
    pictures = acc.Images("samples")
    assert [p.step for p in pictures] == [20, 40] and pictures[0].width > 100


def test_image_runs_log_a_grid_of_samples(cli, tmp_path):
    run = tmp_path / "digits"
    rc, _, err = cli("train", "--data", "digits", "--steps", "2", "--batch-size", "8", "--checkpoint-every", "2",
                     "--log-with", "tensorboard", "--out", run, "--no-plots", "--no-progress")
    assert rc == 0, err
    (picture,) = events(run / "tracking").Images("samples")
    assert (picture.width, picture.height) == (48, 48)  # 6 x 6 digits of 8 x 8 pixels


def test_a_tracker_that_is_not_installed_or_unknown_is_refused(cli, tmp_path):
    import importlib.util

    out = tmp_path / "run"
    if importlib.util.find_spec("wandb") is None:
        line = one_line_error(*cli("train", "--log-with", "wandb", "--out", out, *TINY)[::2])
        assert "--log-with" in line and "wandb" in line and "not installed" in line
    line = one_line_error(*cli("train", "--log-with", "visdom", "--out", out, *TINY)[::2])
    assert "--log-with" in line and "tensorboard" in line
    assert not out.exists()


def test_eval_every_logs_the_ema_networks_measures(cli, tmp_path):
    """--eval-every N: a row in RUN/eval.jsonl every N steps (and at the end) whose measures are
    those of the EMA weights the run saves (recomputed here from the saved run), the same values
    in TensorBoard, eval.png; a resumed run keeps the rows up to its checkpoint and goes on."""
    import torch

    from flowmatch.runs import load_run
    from flowmatch.training import TrainingEval

    run = tmp_path / "run"
    rc, _, err = cli("train", "--steps", "30", "--checkpoint-every", "20", "--eval-every", "20", "--eval-n", "300",
                     "--eval-nfe", "8", "--batch-size", "64", "--log-with", "tensorboard", "--out", run, *TINY)
    assert rc == 0, err
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 30]
    assert {"w2", "floor", "ratio", "off_support", "precision", "recall", "c2st"} <= set(rows[-1])
    assert (run / "eval.png").is_file()
    r = load_run(run, device="cpu")
    again = TrainingEval(r.dataset, None, 300, 8, seed=0)(lambda x0: r.flow(x0, 8, "euler").x, torch.device("cpu"))
    for key in ("w2", "floor", "off_support", "precision", "c2st"):
        assert rows[-1][key] == pytest.approx(again[key], rel=1e-5, abs=1e-6), key
    tb = {e.step: e.value for e in events(run / "tracking").Scalars("eval/ratio")}
    assert tb == pytest.approx({r["step"]: r["ratio"] for r in rows}, rel=1e-6)

    with open(run / "eval.jsonl", "a") as f:  # as if a run killed after its last checkpoint (30) had measured on
        f.write(json.dumps({"step": 35, "n": 300, "nfe": 8, "ratio": 1.0}) + "\n")
    rc, _, err = cli("train", "--resume", "--out", run, "--steps", "40", "--no-progress")
    assert rc == 0, err
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [20, 30, 40]


def test_eval_every_on_digits_uses_the_frechet_measures(cli, tmp_path):
    run = tmp_path / "digits"
    rc, _, err = cli("train", "--data", "digits", "--steps", "2", "--batch-size", "8", "--eval-every", "2",
                     "--eval-n", "100", "--eval-nfe", "2", "--out", run, "--no-plots", "--no-progress")
    assert rc == 0, err
    (row,) = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert row["fd_ratio"] > 1.5  # two steps of training: far from the data
    # the row is the library's measures of the EMA network's samples: 100 noises of seed 0, 2 Euler steps
    from flowmatch.image_metrics import image_scores
    from flowmatch.runs import load_run
    from flowmatch.seeding import noise

    r = load_run(run)
    x = r.flow(noise(0, 0, 100, r.shape), 2, "euler").x
    ref = image_scores(x.clamp(0, 1), "digits", 0, floor_draws=2)
    assert row["fd_ratio"] == pytest.approx(ref["classifier"]["ratio"], rel=1e-5)
    assert row["precision"] == pytest.approx(ref["prdc"]["precision"]["value"], abs=1e-12)
