"""Multi-process training (torchrun + accelerate, gloo on the CPU), precision, divergence."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import TINY

HOOK = '''
import os, sys
_run = os.environ.get("FM_WATCH_DIR")
_log = os.environ.get("FM_WATCH_LOG")
_rank = os.environ.get("RANK", "none")
if _log:  # proof that this process runs the audit (written outside the watched folder)
    with open(_log + ".loaded." + _rank, "w") as f:
        f.write(str(os.getpid()))
def _hook(event, args):
    if event in ("open", "os.rename", "os.replace", "os.remove", "os.mkdir") and args and _run:
        path = str(args[0]) if not isinstance(args[0], int) else ""
        mode = args[1] if event == "open" and len(args) > 1 and isinstance(args[1], str) else "w"
        writing = event != "open" or any(c in mode for c in "wax+")
        if writing and os.path.abspath(path).startswith(_run):
            with open(_log + "." + _rank, "a") as f:
                f.write(event + " " + path + "\\n")
sys.addaudithook(_hook)
'''


def _audited(tmp_path, watch):
    """The environment of a command whose every process (torchrun's workers and the launcher)
    logs its writes under ``watch`` to ``tmp_path/writes.RANK``, and marks that it loaded the audit."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    return {**os.environ, "PYTHONPATH": f"{hook_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "FM_WATCH_DIR": str(watch), "FM_WATCH_LOG": str(tmp_path / "writes")}


def _writes(tmp_path):
    """{rank: [written paths]} from the audit logs, after checking that both workers ran it."""
    loaded = sorted(f.name.rsplit(".", 1)[1] for f in tmp_path.glob("writes.loaded.*"))
    assert {"0", "1"} <= set(loaded), loaded  # the audit was active in both worker processes
    logs = {f.name.split(".", 1)[1]: f.read_text().splitlines() for f in tmp_path.glob("writes.*")
            if not f.name.startswith("writes.loaded.")}
    return {rank: [ln.split(" ", 1)[1] for ln in lines] for rank, lines in logs.items()}


def _names(paths):
    """The files written, a temporary copy ``.NAME.tmp.XXX.ext`` counted as ``NAME``."""
    return {os.path.basename(w).split(".tmp.")[0].lstrip(".") for w in paths}


#: a short run of the default recipe (the stable target, whose reference holds the other processes'
#: rows) at a global batch of 64, logged at every step
SAME_RUN = ["--steps", "6", "--log-every", "1", "--checkpoint-every", "3", "--no-plots", "--precision", "fp32",
            "--stf", "256", *TINY]


def _train(out: Path, processes: int, batch: int, accum: int = 1, *extra, env=None):
    cmd = [sys.executable, "-m", "flowmatch", "train", "--processes", str(processes), "--batch-size", str(batch),
           "--grad-accum", str(accum), "--out", str(out), *SAME_RUN, *extra]
    p = subprocess.run(cmd, env=env or {**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()], load_file(out / "model.safetensors")


def _same(a, b, name):
    """Losses at every step and final weights equal up to the reduction order of floats."""
    import torch

    (la, wa), (lb, wb) = a, b
    assert len(la) == len(lb) == 6, name
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-5 * abs(x), (name, la, lb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{name} {k}: {m}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("same") / "one", 1, 64)


@pytest.mark.xdist_group("same-run")
def test_the_same_global_batch_trains_the_same_run_with_gradient_accumulation(one_process, tmp_path):
    """A step's draws are those of the whole global batch, from the step's own generator (seed, step):
    two micro-batches of 32 are the one batch of 64 split, losses and weights alike."""
    _same(one_process, _train(tmp_path / "accum", 1, 32, 2), "1 process, 2 micro-batches")


@pytest.mark.xdist_group("same-run")
def test_the_same_global_batch_trains_the_same_run_on_two_processes(one_process, tmp_path):
    """The same seed and global batch on 2 processes (4: the next test, in the full tier) give the loss of the
    1-process run at every step and its weights, up to the reduction order of floats; only the
    main process writes the run directory, and a run resumes on another number of processes: 2 processes
    train to the step-3 checkpoint, 1 process resumes to step 6, and all six steps' losses and the weights
    are the 1-process run's (one 2-process launch: the weights at step 3 are what step 4 starts from)."""
    two = tmp_path / "two"
    _train(two, 2, 32, 1, "--steps", "3", env={**_audited(tmp_path, two), "OMP_NUM_THREADS": "1"})
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["num_processes"] == 2 and cfg["global_batch_size"] == 64
    writes = _writes(tmp_path)
    assert list(writes) == ["0"], list(writes)  # rank 1 (and the launcher) never touched the run directory
    assert {"config.json", "trainer_state.pt", "model.safetensors", "ema.safetensors"} <= _names(writes["0"])
    p = subprocess.run([sys.executable, "-m", "flowmatch", "train", "--resume", "--out", str(two), "--steps", "6",
                        "--no-progress"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = json.loads((two / "config.json").read_text())
    assert resumed["num_processes"] == 1 and resumed["train"]["batch_size"] == 64 and resumed["global_batch_size"] == 64
    _same(one_process, ([json.loads(line)["loss"] for line in (two / "metrics.jsonl").read_text().splitlines()],
                        load_file(two / "model.safetensors")), "2 processes, resumed on 1")


@pytest.mark.full  # four processes on two cores: 40 s, in the full tier (python -m pytest -m full -n 0)
@pytest.mark.xdist_group("same-run")
def test_the_same_global_batch_trains_the_same_run_on_four_processes(one_process, tmp_path):
    _same(one_process, _train(tmp_path / "four", 4, 16), "4 processes")


def test_meanflow_with_ot_pairs_is_the_same_run_on_two_processes(tmp_path):
    """MeanFlow's recipe (minibatch OT over the global batch, the JVP on the bare network beside
    DDP's forward, rows from its own trajectories in every part): 1 and 2 processes train alike."""
    extra = ["--objective", "meanflow", "--meanflow-distill-start", "0.3", "--meanflow-distill-every", "2",
             "--meanflow-distill-pairs", "64", "--stf", "0"]
    _same(_train(tmp_path / "one", 1, 64, 1, *extra), _train(tmp_path / "two", 2, 32, 1, *extra), "meanflow, 2 processes")


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli("train", "--steps", "20", "--checkpoint-every", "10", "--log-every", "10", "--out", run,
                     "--no-plots", *TINY)
    assert rc == 0, err
    good = load_file(run / "model.safetensors")
    # resume the same run with an absurd learning rate: edit its config as a user might
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"].update(steps=60, lr=1e12, grad_clip=None, warmup_steps=0, schedule="constant")
    (run / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli("train", "--resume", "--out", run, "--no-progress")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "diverged" in lines[0] and "step" in lines[0], err
    after = load_file(run / "model.safetensors")
    assert all((after[k] == good[k]).all() for k in good)  # the last good checkpoint is intact


@pytest.mark.parametrize("objective", ["cfm", "meanflow", "shortcut"])
@pytest.mark.parametrize("data", ["checkerboard", "digits"])
def test_every_objective_trains_under_bf16_autocast_on_either_network(cli, tmp_path, objective, data):
    """bf16 autocast (--precision bf16; --precision auto on a CUDA device) trains every objective on
    the MLP and the UNet: the network's bf16 outputs meet fp32 targets (shortcut's two half steps,
    MeanFlow's Jacobian-vector product, which forward-mode AD cannot take through a convolution
    under CPU autocast) and the weights stay fp32 and finite."""
    import torch

    run = tmp_path / "run"
    net = TINY if data == "checkerboard" else ["--no-progress"]
    rc, _, err = cli("train", "--data", data, "--objective", objective, "--precision", "bf16", "--steps", "2",
                     "--batch-size", "8", "--no-plots", "--out", run, *net)
    assert rc == 0, err
    weights = load_file(run / "model.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_bf16_and_gradient_accumulation_train(cli, tmp_path, monkeypatch):
    """bf16 runs the network's forward pass under autocast (its output is bfloat16), in two
    micro-batches of 32 per step; it lands near the fp32 run of the same seed, not on it."""
    import torch

    from flowmatch import objectives

    seen = []
    original = objectives.cfm_loss

    def spy(model, *args, **kwargs):  # the loop's loss, with the network's own outputs recorded
        net = getattr(model, "net", model)  # inside the data-prediction wrapper (which returns fp32)
        hook = net.register_forward_hook(lambda _, inputs, out: seen.append((len(inputs[0]), out.dtype)))
        try:
            return original(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(objectives, "cfm_loss", spy)
    runs, losses = {}, {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        run = runs[precision] = tmp_path / precision
        rc, _, err = cli("train", "--steps", "10", "--precision", precision, "--grad-accum", "2", "--batch-size", "32",
                         "--log-every", "2", "--out", run, "--no-plots", *TINY)
        assert rc == 0, err
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        assert seen == [(32, dtype)] * 20, seen[:3]  # 10 steps x 2 micro-batches of 32
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["global_batch_size"] == 64 and cfg["train"]["precision"] == precision
        losses[precision] = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["bf16"]) == 5 and all(math.isfinite(v) for v in losses["bf16"])
    # bf16 keeps 8 significant bits (relative rounding 4e-3 per operation); the logged losses of
    # seeds 0-2 came within 7e-4 of fp32's, so 5e-3 leaves a margin of 7
    for a, b in zip(losses["bf16"], losses["fp32"]):
        assert abs(a - b) < 5e-3 * abs(b), (losses["bf16"], losses["fp32"])
    w16, w32 = load_file(runs["bf16"] / "model.safetensors"), load_file(runs["fp32"] / "model.safetensors")
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)  # rounding did happen: autocast was on
    for k in w32:  # and moved the weights by rounding only (measured: 0.4% of their scale at most)
        assert (w16[k] - w32[k]).abs().max() <= 0.02 * w32[k].abs().max(), k


def test_pairs_do_not_depend_on_the_number_of_processes(cli, tmp_path):
    import torch

    teacher = tmp_path / "teacher"
    rc, _, err = cli("train", "--steps", "20", "--out", teacher, "--no-plots", *TINY)
    assert rc == 0, err
    common = ["--pairs", "100", "--shard-size", "32", "--teacher-nfe", "4", "--steps", "4", "--batch-size", "16",
              "--no-progress", "--no-plots"]
    rc, _, err = cli("reflow", teacher, "--out", tmp_path / "one", *common)
    assert rc == 0, err
    two = tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "flowmatch", "reflow", str(teacher), "--out", str(two),
                        "--processes", "2", *common], env=_audited(tmp_path, two), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 1 writes its own pair shards (1 and 3 of 0-3) and nothing else; rank 0 everything else
    writes = _writes(tmp_path)
    assert sorted(writes) == ["0", "1"], sorted(writes)
    names = {rank: _names(ws) for rank, ws in writes.items()}
    assert names["1"] == {"shard-00001.safetensors", "shard-00003.safetensors"}, writes["1"]
    assert all(os.path.dirname(w) == str(two / "pairs") for w in writes["1"]), writes["1"]
    assert {"shard-00000.safetensors", "shard-00002.safetensors", "pairs.json", "config.json",
            "model.safetensors"} <= names["0"] and not names["0"] & names["1"], names["0"]
    one = sorted((tmp_path / "one" / "pairs").glob("shard-*.safetensors"))
    two = sorted((tmp_path / "two" / "pairs").glob("shard-*.safetensors"))
    assert [f.name for f in one] == [f.name for f in two] and len(one) == 4
    for a, b in zip(one, two):
        ta, tb = load_file(a), load_file(b)
        assert torch.equal(ta["z0"], tb["z0"])  # the noise of a shard is its own
        torch.testing.assert_close(ta["z1"], tb["z1"], rtol=1e-5, atol=1e-5)  # up to thread-count rounding
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["num_processes"] == 2 and cfg["train"]["lineage"]["kind"] == "reflow"


def test_sampling_across_processes_gives_the_same_samples(cli, tiny_run, tmp_path):
    import numpy as np

    common = ["--n", "700", "--batch-size", "128", "--nfe", "4", "--no-progress"]
    rc, _, err = cli("sample", tiny_run, "--out", tmp_path / "one.npy", *common)
    assert rc == 0, err
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run([sys.executable, "-m", "flowmatch", "sample", str(tiny_run), "--out", str(out / "two.npy"),
                        "--processes", "2", *common], env=_audited(tmp_path, out), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    np.testing.assert_allclose(np.load(out / "two.npy"), np.load(tmp_path / "one.npy"), rtol=1e-5, atol=1e-5)
    writes = _writes(tmp_path)
    assert list(writes) == ["0"] and _names(writes["0"]) == {"two.npy"}, writes  # only rank 0 writes, only the file


def test_a_process_takes_its_process_group_down_before_it_exits(tiny_run, tmp_path):
    """Left to the interpreter's exit, gloo's threads were torn down in no set order and a worker
    could abort after its work was done (about 1 run in 7 of the test above)."""
    script = (f"import torch.distributed as dist; from flowmatch.cli import run; "
              f"rc = run(['sample', {str(tiny_run)!r}, '--out', {str(tmp_path / 'x.npy')!r}, '--n', '10', "
              f"'--nfe', '2', '--no-progress']); print(rc, dist.is_available() and dist.is_initialized())")
    import socket

    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-2:] == ["0", "False"], p.stdout  # the group was up (the sample ran under it), now down


def test_compiled_training_matches_eager(cli, tmp_path):
    """--compile changes how the network runs, not what it computes: the same weights up to fp32's
    rounding (fp32 pinned: --precision auto is bf16 on a CUDA device)."""
    import torch

    args = ["train", "--steps", "15", "--batch-size", "64", "--no-plots", "--checkpoint-every", "15", "--precision", "fp32",
            *TINY]
    rc, _, err = cli(*args, "--out", tmp_path / "eager")
    assert rc == 0, err
    rc, _, err = cli(*args, "--compile", "--out", tmp_path / "compiled")
    assert rc == 0, err
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["train"]["compile"] is True
    eager, compiled = load_file(tmp_path / "eager" / "model.safetensors"), load_file(tmp_path / "compiled" / "model.safetensors")
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5)


def test_bad_input_found_by_a_worker_is_one_line(tmp_path):
    """A worker that stops on bad input (here: a loss that diverges) makes the launcher say one
    line and exit 2; torchrun's own failure report is held back."""
    cmd = [sys.executable, "-m", "flowmatch", "train", "--processes", "2", "--steps", "40", "--batch-size", "32",
           "--lr", "1e12", "--grad-clip", "0", "--warmup-steps", "0", "--schedule", "constant",
           "--out", str(tmp_path / "run"), "--no-plots", *TINY]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("flowmatch: error: training diverged")
