"""train --config FILE.toml and --print-config: the file's settings, the command line over them,
a round trip, and bad files refused in one line (hypothesis for generated files)."""

import json
import os

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from flowmatch.config import TrainConfig, data_kind, recipe

from helpers import one_line_error, plain_help

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def test_the_command_line_overrides_the_file_and_print_config_round_trips(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text('steps = 300\nwidth = 64\nobjective = "shortcut"\ntime_dist = "logit-normal"\n'
                                       'grad_clip = 0.5\ncompile = false\n')
    rc, out, err = cli("train", "--config", "run.toml", "--width", "32", "--print-config")
    assert rc == 0, err
    printed = tomllib.loads(out)
    assert printed["steps"] == 300 and printed["objective"] == "shortcut" and printed["time_dist"] == "logit-normal"
    assert printed["width"] == 32  # the command line wins
    assert printed["depth"] == TrainConfig().depth and printed["grad_clip"] == 0.5  # defaults, the file
    assert os.listdir(tmp_path) == ["run.toml"]  # printing writes nothing
    (tmp_path / "eff.toml").write_text(out)
    rc, again, err = cli("train", "--config", "eff.toml", "--print-config")
    assert rc == 0 and again == out, err
    # every printed setting is the effective config's, so the file trains exactly that run
    assert set(printed) | {k for k in TrainConfig().to_dict() if f"# {k}:" in out} >= set(TrainConfig().to_dict()) - {"lineage"}


def test_a_run_trained_from_a_file_saves_its_settings(cli, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('steps = 3\nbatch_size = 16\nwidth = 32\ndepth = 2\nfourier = 0\nplots = false\nseed = 7\n')
    rc, _, err = cli("train", "--config", cfg, "--out", tmp_path / "run", "--no-progress")
    assert rc == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (saved["steps"], saved["batch_size"], saved["width"], saved["depth"], saved["fourier"], saved["seed"]) == \
        (3, 16, 32, 2, 0, 7)


@pytest.mark.parametrize("text, expected", [
    ("time-dist = 'uniform'\n", "unknown setting 'time-dist' (did you mean time_dist?)"),
    ("widht = 3\n", "unknown setting 'widht'"),
    ("width = 'big'\n", "setting 'width' should be"),
    ("steps = 1.5\n", "setting 'steps' should be"),
    ("steps = \n", "not valid TOML"),
    ("width = -4\n", "--width"),
])
def test_bad_files_are_one_line_and_write_nothing(cli, tmp_path, text, expected):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    rc, _, err = cli("train", "--config", f, "--out", tmp_path / "run", "--no-progress")
    line = one_line_error(rc, err)
    assert expected in line and not (tmp_path / "run").exists(), line
    if "TOML" in expected or "setting" in expected:
        assert str(f) in line


def test_config_files_are_not_for_resume_and_must_exist(cli, tmp_path):
    line = one_line_error(*cli("train", "--config", tmp_path / "missing.toml", "--out", tmp_path / "run")[::2])
    assert "--config" in line and "missing.toml" in line
    (tmp_path / "run.toml").write_text("steps = 3\n")
    line = one_line_error(*cli("train", "--resume", "--config", tmp_path / "run.toml", "--out", tmp_path / "run")[::2])
    assert "--config" in line and "--resume" in line


VALUES = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans(),
                   st.sampled_from(["uniform", "shortcut", "cosine", "", "x\"y", "checkerboard"]))
KEYS = st.sampled_from(["steps", "width", "depth", "lr", "objective", "time_dist", "schedule", "data", "fourier",
                        "plots", "ema_decay", "unknown_key", "seed", "label_dropout"])


def _toml_value(v):
    return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)


@given(settings=st.dictionaries(KEYS, VALUES, max_size=4))
@example(settings={"steps": 0})
@example(settings={"objective": "shortcut", "lr": 1e-3})
def test_generated_files_print_or_are_refused(cli, settings):
    """Any file of these keys and values: printed back (the same values) or one line, exit 2."""
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="flowmatch-cfg-"))
    f = d / "run.toml"
    f.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items()))
    rc, out, err = cli("train", "--config", f, "--print-config", "--width", "16", "--depth", "1")
    assert "Traceback" not in err
    if rc == 0:
        printed = tomllib.loads(out)
        for k, v in settings.items():
            if k not in ("width", "depth"):
                assert printed[k] == v or (isinstance(v, float) and printed[k] == pytest.approx(v)), (k, v, printed[k])
    else:
        one_line_error(rc, err)
    assert os.listdir(d) == ["run.toml"]


def test_precision_auto_is_bf16_on_a_cuda_device_with_bfloat16_else_fp32(monkeypatch):
    import torch

    from flowmatch.config import TrainConfig

    cfg = TrainConfig()
    assert cfg.precision == "auto" and cfg.amp("cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cfg.amp("cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert cfg.amp("cuda") == "fp32"
    for chosen in ("fp32", "bf16", "fp16"):
        assert TrainConfig(precision=chosen).amp("cuda") == chosen


def test_the_learning_rate_left_unset_follows_the_unet_preset(cli):
    """The 36 M-parameter cifar preset trains at the DDPM recipe's 2e-4 (at 2e-3 it diverged on
    digits); every other network at 2e-3; a rate given, on the command line or in a file, wins."""
    from flowmatch.config import recipe

    assert TrainConfig().lr is None  # the recipe's, once the data are known
    assert recipe("image", "cfm")["lr"] == 2e-3 and recipe("image", "cfm", "tiny")["lr"] == 2e-3
    assert recipe("image", "cfm", "cifar")["lr"] == 2e-4 and recipe("toy", "cfm", "cifar")["lr"] == 2e-3
    for args, lr in ((["--data", "digits", "--unet", "cifar"], 2e-4), (["--data", "digits"], 2e-3),
                     (["--data", "digits", "--unet", "cifar", "--lr", "5e-4"], 5e-4)):
        rc, out, err = cli("train", *args, "--print-config")
        assert rc == 0, err
        assert tomllib.loads(out)["lr"] == lr, (args, out)


def test_28x28_digits_train_their_own_measured_budget(cli):
    """`--data mnist` trains 1500 steps (a UNet step there takes about 1.2 s on 2 cores; the images'
    9000 were measured on 8x8 digits); other objectives, other images and a budget given keep theirs."""
    from flowmatch.config import recipe

    assert recipe("image", "cfm", data="mnist")["steps"] == 1500 and recipe("image", "cfm", data="digits")["steps"] == 9000
    assert recipe("image", "meanflow", data="mnist")["steps"] == 9000
    for args, steps in ((["--data", "mnist"], 1500), (["--data", "digits"], 9000), (["--data", "mnist", "--steps", "20"], 20)):
        rc, out, err = cli("train", *args, "--print-config")
        assert rc == 0, err
        assert tomllib.loads(out)["steps"] == steps, (args, out)
    rc, out, _ = cli("train", "--help")
    assert "the cifar UNet preset 0.0002" in plain_help(out), out


def test_the_ema_decay_is_warmed_up_as_its_help_says(cli):
    """min(decay, (1 + step) / (10 + step)): the default 0.999 is reached after 8991 steps, so at
    the default 4000 steps any decay above 0.9978 is the warm-up's (README, "The EMA is not what blurs")."""
    from flowmatch.config import ema_decay_at

    cfg = TrainConfig()
    assert ema_decay_at(cfg, 0) == pytest.approx(0.1)
    assert next(s for s in range(20000) if ema_decay_at(cfg, s) == cfg.ema_decay) + 1 == 8991
    assert ema_decay_at(TrainConfig(ema_decay=0.9995), 3999) == ema_decay_at(cfg, 3999) < 0.9978
    assert ema_decay_at(TrainConfig(ema_decay=0.99), 3999) == 0.99
    rc, out, _ = cli("train", "--help")
    assert "0.999 after 8991 steps" in plain_help(out), out


@pytest.mark.parametrize("settings", [{}, {"objective": "meanflow"}, {"data": "digits", "objective": "shortcut"},
                                      {"stf": 0, "fourier": 0}])
def test_python_and_the_command_line_write_the_same_settings(cli, tmp_path, settings):
    """One source of defaults: ``train(TrainConfig(...))`` and ``flowmatch train`` with the same
    settings write the same config.json (the recipe for the data kind and objective resolved alike)."""
    from flowmatch import TrainConfig, train

    budget = {"steps": 2, "batch_size": 16, "width": 16, "depth": 1, "plots": False}
    both = settings | budget | ({} if "data" in settings else {"n_points": 256})
    args = [a for k, v in both.items() for a in (f"--{k.replace('_', '-')}", str(v)) if k != "plots"]
    rc, _, err = cli("train", *args, "--no-plots", "--no-progress", "--out", tmp_path / "cli")
    assert rc == 0, err
    train(TrainConfig(**both), out=tmp_path / "py", progress=False)
    a, b = (json.loads((tmp_path / d / "config.json").read_text())["train"] for d in ("cli", "py"))
    assert a == b
    cfg = TrainConfig(**both)
    values = recipe(data_kind(cfg.build().dataset), cfg.objective, stable_target=settings.get("stf") != 0)
    wrong = {k: (a[k], v) for k, v in values.items() if k not in both and a[k] != v}
    assert not wrong  # every setting left unset is the recipe's
