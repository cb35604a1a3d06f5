import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowmatch.runs import RunLock, load_run

from helpers import TINY, copy_run, exact_w2, one_line_error


def _tree(path):
    """Every file under ``path`` with its size and modification time."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def test_train_writes_the_run_directory(tiny_run):
    for name in ("config.json", "model.safetensors", "ema.safetensors", "trainer_state.pt", "metrics.jsonl",
                 "samples.png", "trajectories.png", "field.png", "loss.png", "flow.gif"):
        assert (tiny_run / name).is_file(), name
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["train"]["steps"] == 60 and cfg["shape"] == [2]
    rows = [json.loads(ln) for ln in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 60]
    assert all(set(r) >= {"step", "loss", "lr", "time"} for r in rows)
    assert not any(p.name.endswith(".tmp") or ".tmp." in p.name for p in tiny_run.iterdir())


def test_sample_npy_and_png(cli, tiny_run, tmp_path):
    rc, _, err = cli("sample", tiny_run, "--n", 300, "--nfe", 8, "--solver", "midpoint", "--out", tmp_path / "x.npy",
                     "--no-progress")
    assert rc == 0, err
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (300, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    # the same seed gives the same samples; batches do not change them within a batch size
    rc, _, _ = cli("sample", tiny_run, "--n", 300, "--nfe", 8, "--solver", "midpoint", "--out", tmp_path / "y.npy",
                   "--no-progress")
    assert np.array_equal(x, np.load(tmp_path / "y.npy"))
    rc, _, err = cli("sample", tiny_run, "--n", 200, "--out", tmp_path / "x.png", "--no-progress")
    assert rc == 0, err
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_sample_matches_the_python_api(cli, tiny_run, tmp_path):
    cli("sample", tiny_run, "--n", 64, "--nfe", 4, "--seed", 3, "--out", tmp_path / "x.npy", "--no-progress")
    api = load_run(tiny_run).sample(64, nfe=4, seed=3)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), api.numpy())
    # streamed to disk batch by batch (the last one short): the same rows as the API's batches
    cli("sample", tiny_run, "--n", 50, "--nfe", 4, "--seed", 3, "--batch-size", 16, "--out", tmp_path / "y.npy", "--no-progress")
    api = load_run(tiny_run).sample(50, nfe=4, seed=3, batch_size=16)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), api.numpy())


def test_eval_json(cli, tiny_run):
    rc, out, err = cli("eval", tiny_run, "--nfe", "1,4", "--n", 300, "--json", "--tol", "1e-3")
    assert rc == 0, err
    res = json.loads(out)
    assert set(res["nfe"]) == {"1", "4"} and res["adaptive"]["solver"] == "dopri5"
    # W2 recomputed independently: equal-size, equal-weight clouds, so the optimal plan is a
    # permutation (scipy's Hungarian method), on the samples and data draws eval is documented
    # to use (the run's samples at each NFE from --seed, 3 reference and 3 fresh draws from seed + 1)
    from flowmatch.solvers import integrate

    w2 = exact_w2

    r = load_run(tiny_run)
    from flowmatch.seeding import generator, noise

    g = generator(0, "reference", 0)  # eval's reference draws
    refs = [r.dataset.reference(300, g) for _ in range(3)]
    fresh = [r.dataset.reference(300, g) for _ in range(3)]
    floor = np.mean([w2(a, b) for a, b in zip(refs, fresh)])
    for k in (1, 4):
        row = res["nfe"][str(k)]
        assert row["floor"] == pytest.approx(floor, rel=1e-9)
        x = r.sample(300, nfe=k, seed=0)
        assert row["w2"] == pytest.approx(np.mean([w2(x, ref) for ref in refs]), rel=1e-9), k
        assert row["ratio"] == pytest.approx(row["w2"] / floor, rel=1e-9)
    assert res["nfe"]["1"]["w2"] != res["nfe"]["4"]["w2"]  # --nfe reached the sampler
    # the adaptive NFE is the number of velocity evaluations dopri5 makes from the same noise
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return r.velocity(x, t)

    with torch.inference_mode():
        end = integrate(counted, noise(0, 0, 300, r.shape), "dopri5", None, tol=1e-3)
    assert res["adaptive"]["nfe"] == calls[0]
    assert res["adaptive"]["w2"] == pytest.approx(np.mean([w2(r.dataset.decode(end.x), ref) for ref in refs]), rel=1e-9)
    # the sharpness columns are the library's measures of the same samples
    from flowmatch.metrics import off_support

    x = load_run(tiny_run).sample(300, nfe=4, seed=0)
    assert res["nfe"]["4"]["off_support"] == off_support("checkerboard", x)
    assert res["data"]["off_support"] == 0.0 and 0.4 < res["data"]["c2st"] < 0.6
    # precision and recall by their definition (Kynkaanniemi et al. 2019): the share of one set
    # inside the union of the other's balls, each ball reaching its centre's 5th nearest neighbour
    def inside(points, centres):
        radius = torch.cdist(centres, centres).kthvalue(6, dim=1).values  # the 0 to itself first
        return (torch.cdist(points, centres) < radius[None]).any(1).double().mean().item()

    x, ref = x.double(), refs[0].double()
    assert res["nfe"]["4"]["precision"] == pytest.approx(inside(x, ref), abs=1e-12)
    assert res["nfe"]["4"]["recall"] == pytest.approx(inside(ref, x), abs=1e-12)
    # and density (Naeem et al. 2020): how many real balls hold a sample, over 5, averaged
    radius = torch.cdist(ref, ref).kthvalue(6, dim=1).values
    density = (torch.cdist(x, ref) < radius[None]).double().sum(1).mean().item() / 5
    assert res["nfe"]["4"]["density"] == pytest.approx(density, rel=1e-12)
    # straightness (Liu et al. 2022) by its definition, on 100 Euler steps from eval's noise
    z = [noise(0, 0, 300, r.shape)]
    with torch.inference_mode():
        for k in range(100):
            z.append(z[-1] + r.velocity(z[-1], torch.full((300,), k / 100)) / 100)
        s = sum(((z[-1] - z[0]) - r.velocity(z[k], torch.full((300,), k / 100))).pow(2).sum(1).mean().item()
                for k in range(100)) / 100
    assert res["straightness"] == pytest.approx(s, rel=1e-4)


def test_plot_redraws(cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")  # the shared run stays as other tests read it
    (run / "samples.png").unlink()
    rc, _, err = cli("plot", run)
    assert rc == 0, err
    assert (run / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_existing_run_is_not_overwritten(cli, tiny_run):
    before = _tree(tiny_run)
    rc, _, err = cli("train", "--steps", "5", "--out", tiny_run, *TINY)
    assert "--resume" in one_line_error(rc, err)
    assert _tree(tiny_run) == before


def test_array_data_trains_and_samples_in_data_units(cli, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "d.npy", rng.normal([100.0, -5.0, 0.0], [10.0, 1.0, 0.1], size=(500, 3)))
    rc, _, err = cli("train", "--data", tmp_path / "d.npy", "--steps", "150", "--batch-size", "128",
                     "--out", tmp_path / "run", "--no-plots", *TINY)
    assert rc == 0, err
    rc, _, err = cli("sample", tmp_path / "run", "--n", "500", "--out", tmp_path / "s.npy", "--no-progress")
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (500, 3)
    # in data units: each column's mean within a fraction of its own spread
    assert np.all(np.abs(x.mean(0) - [100.0, -5.0, 0.0]) < np.array([10.0, 1.0, 0.1]) * 0.3), x.mean(0)


BAD_TRAIN = [
    (["--data", "swissroll"], "checkerboard, moons"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "abc"], "--lr"),
    (["--path", "spline"], "--path"),
    (["--coupling", "magic"], "--coupling"),
    (["--time-dist", "beta"], "--time-dist"),
    (["--schedule", "step"], "--schedule"),
    (["--model", "transformer"], "--model"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    pytest.param(["--precision", "fp16"], "--precision",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on CUDA")),
    (["--n-points", "1"], "--n-points"),
    (["--bogus"], "bogus"),
]


@pytest.mark.parametrize("args,needle", BAD_TRAIN, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_train_options(cli, tmp_path, args, needle):
    out = tmp_path / "run"
    rc, _, err = cli("train", "--out", out, *args, *TINY)
    assert needle in one_line_error(rc, err)
    assert not out.exists()


@pytest.mark.parametrize(
    "content,needle",
    [(np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"), ("1,2\n3,oops\n", "not numeric"), ("", "empty"),
     (np.zeros((3, 2, 2)), "2 dimensions")],
    ids=["nan", "text", "empty", "shape"],
)
def test_bad_data_files(cli, tmp_path, content, needle):
    if isinstance(content, np.ndarray):
        f = tmp_path / "d.npy"
        np.save(f, content)
    else:
        f = tmp_path / "d.csv"
        f.write_text(content)
    rc, _, err = cli("train", "--data", f, "--out", tmp_path / "run", *TINY)
    line = one_line_error(rc, err)
    assert needle in line and str(f) in line
    assert not (tmp_path / "run").exists()


BAD_SAMPLE = [
    (["--solver", "leapfrog"], "euler, midpoint, heun, rk4, dopri5"),
    (["--nfe", "0"], "--nfe"),
    (["--solver", "rk4", "--nfe", "6"], "multiple of 4"),
    (["--n", "0"], "--n"),
]


@pytest.mark.parametrize("args,needle", BAD_SAMPLE, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_sample_options(cli, tiny_run, tmp_path, args, needle):
    rc, _, err = cli("sample", tiny_run, "--out", tmp_path / "x.npy", *args, "--no-progress")
    assert needle in one_line_error(rc, err)
    assert not (tmp_path / "x.npy").exists()


def test_unsupported_out_extension(cli, tiny_run, tmp_path):
    rc, _, err = cli("sample", tiny_run, "--out", tmp_path / "x.txt")
    assert ".npy" in one_line_error(rc, err)
    assert not (tmp_path / "x.txt").exists()


def test_eval_bad_nfe_list(cli, tiny_run):
    rc, _, err = cli("eval", tiny_run, "--nfe", "1,x")
    assert "--nfe" in one_line_error(rc, err)


@pytest.mark.parametrize("damage", ["missing", "no-config", "garbage-config", "newer-format", "unknown-key",
                                    "wrong-type", "truncated-weights", "wrong-weights"])
def test_damaged_run_directories(cli, tiny_run, tmp_path, damage):
    run = tmp_path / "missing" if damage == "missing" else copy_run(tiny_run, tmp_path / "run")
    cfg_file = run / "config.json"
    if damage == "no-config":
        cfg_file.unlink()
    elif damage == "garbage-config":
        cfg_file.write_text("{not json")
    elif damage in ("newer-format", "unknown-key", "wrong-type"):
        cfg = json.loads(cfg_file.read_text())
        if damage == "newer-format":
            cfg["format_version"] = 99
        elif damage == "unknown-key":
            cfg["train"]["flux_capacitor"] = 1
        else:
            cfg["train"]["steps"] = "many"
        cfg_file.write_text(json.dumps(cfg))
    elif damage == "truncated-weights":
        data = (run / "ema.safetensors").read_bytes()
        (run / "ema.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "wrong-weights":
        cfg = json.loads(cfg_file.read_text())
        cfg["train"]["width"] = 64
        cfg_file.write_text(json.dumps(cfg))
    rc, _, err = cli("sample", run, "--n", 10, "--out", tmp_path / "x.npy", "--no-progress")
    one_line_error(rc, err)
    assert not (tmp_path / "x.npy").exists()


def test_pickle_payload_in_trainer_state_is_never_run(cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 1, "evil": Payload()}, run / "trainer_state.pt")
    before = _tree(run)
    rc, _, err = cli("train", "--resume", "--out", run, "--no-progress")
    assert "trainer_state.pt" in one_line_error(rc, err)
    assert not marker.exists()
    assert _tree(run) == before


def test_a_second_trainer_is_refused(cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    with RunLock(run):
        rc, _, err = cli("train", "--resume", "--out", run, "--no-progress")
    assert "another trainer" in one_line_error(rc, err)


def test_python_dash_m_entry_point():
    p = subprocess.run([sys.executable, "-m", "flowmatch", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "train" in p.stdout


def test_time_shift_moves_the_sampling_grid(cli, tiny_run, tmp_path):
    """`sample --time-shift s` integrates on the grid t / (s - (s - 1) t), exactly as the library does."""
    import numpy as np
    import torch

    from flowmatch.runs import load_run
    from flowmatch.solvers import fixed_grid, integrate

    grid = fixed_grid("euler", 4, time_shift=0.5).double()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(grid, t / (0.5 + 0.5 * t))
    rc, _, err = cli("sample", tiny_run, "--n", "64", "--nfe", "8", "--solver", "midpoint", "--time-shift", "0.35",
                     "--out", tmp_path / "x.npy", "--no-progress")
    assert rc == 0, err
    run = load_run(tiny_run)
    from flowmatch.seeding import noise

    x0 = noise(0, 0, 64, run.shape)  # sampling batch 0's noise
    with torch.inference_mode():
        want = run.dataset.decode(integrate(run.velocity, x0, "midpoint", 8, time_shift=0.35).x)
        plain = run.dataset.decode(integrate(run.velocity, x0, "midpoint", 8).x)
    got = torch.from_numpy(np.load(tmp_path / "x.npy"))
    torch.testing.assert_close(got, want.float())
    assert not torch.allclose(got, plain.float())
    rc, _, err = cli("sample", tiny_run, "--time-shift", "0", "--out", tmp_path / "y.npy")
    assert "--time-shift" in one_line_error(rc, err) and not (tmp_path / "y.npy").exists()


def test_train_options_are_made_from_the_config_fields(cli, tmp_path):
    """Every TrainConfig field offered on the command line is a train option with the field's
    default (the recipe's settings are unset: config.RECIPES chooses them by the data's kind and the
    objective); a new field, --adam-beta2, reaches AdamW."""
    import dataclasses

    import typer.main

    from flowmatch.cli import app
    from flowmatch.config import RECIPE_SETTINGS, StudentOptions, TrainConfig

    def options(name):
        command = typer.main.get_command(app).commands[name]
        return {p.name: p.default for p in command.params}

    train = options("train")
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["cli"]:
            assert train[f.name] == (None if f.name in RECIPE_SETTINGS else getattr(TrainConfig(), f.name)), f.name
        else:
            assert f.name not in train
    for name in ("reflow", "distill"):
        student = options(name)
        for f in dataclasses.fields(StudentOptions):
            only = {"k": "distill", "time_dist": "reflow"}  # distillation's times are its k-step grid
            if f.name in only and name != only[f.name]:
                assert f.name not in student, (name, f.name)
            else:
                assert student[f.name] == getattr(StudentOptions(), f.name), (name, f.name)
    rc, _, err = cli("train", "--adam-beta2", "0.95", "--steps", "2", "--no-plots", "--out", tmp_path / "r", *TINY)
    assert rc == 0, err
    state = torch.load(tmp_path / "r" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["adam_beta2"] == 0.95
    rc, _, err = cli("train", "--adam-beta2", "1", "--out", tmp_path / "bad", *TINY)
    assert "--adam-beta2" in one_line_error(rc, err) and not (tmp_path / "bad").exists()


def test_bf16_on_a_cpu_without_bf16_units_warns(cli, tmp_path, monkeypatch):
    """bf16 autocast is emulated (about 20x slower than fp32) on CPUs without AMX or AVX512-BF16:
    train says so, and says nothing where the CPU has them."""
    import warnings

    from flowmatch import training

    for has, expect in ((False, 1), (True, 0)):
        monkeypatch.setattr(training, "cpu_has_bf16", lambda has=has: has)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            rc, _, err = cli("train", "--precision", "bf16", "--steps", "1", "--no-plots", "--out", tmp_path / f"r{has}", *TINY)
        assert rc == 0, err
        assert sum("no bfloat16 units" in str(w.message) for w in seen) == expect


def test_film_on_images_is_refused_before_anything_is_written(cli, tmp_path):
    rc, _, err = cli("train", "--data", "digits", "--film", "--out", tmp_path / "run", *TINY)
    assert "--film" in one_line_error(rc, err)
    assert not (tmp_path / "run").exists()
