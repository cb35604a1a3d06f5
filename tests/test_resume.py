"""Kill a training process with SIGKILL and resume it: the weights end bit-identical.

Kills land just after a checkpoint, between two checkpoints, between writing a checkpoint
file's temporary copy and renaming it into place, between the checkpoint's files, and during
the teacher's pair generation of a reflow run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--steps", "240", "--batch-size", "64", "--width", "48", "--depth", "2", "--checkpoint-every", "40",
        "--log-every", "20", "--no-plots", "--no-progress", "--warmup-steps", "30"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(out, *extra, wait=True):
    cmd = [sys.executable, "-m", "flowmatch", "train", "--out", str(out), *ARGS, *extra]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out_, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    return p


def _step(out):
    state = out / "trainer_state.pt"
    if not state.exists():
        return 0
    try:
        return int(torch.load(state, weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - being replaced right now
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every killed one must end equal to."""
    ref = tmp_path_factory.mktemp("resume") / "ref"
    _train(ref)
    return ref


def _same_run(ref, other):
    """Bit-identical weights and the same log, and no temporary file left behind."""
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ref / name), load_file(other / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    rows_ref = [json.loads(ln) for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(ln) for ln in (other / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in rows_ref]
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_ref]
    assert not [p.name for p in other.iterdir() if ".tmp." in p.name]


def test_killed_run_resumes_bit_identically(tmp_path, reference):
    killed = tmp_path / "killed"
    p = _train(killed, wait=False)
    deadline = time.time() + 300
    while _step(killed) < 80 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    at_kill = _step(killed)
    assert 80 <= at_kill < 240, "the run should be killed mid-way"
    _train(killed, "--resume")
    _same_run(reference, killed)


# Runs flowmatch in a process that SIGKILLs itself at a chosen point: after appending the log
# line of a step, or just before the n-th rename of a file into place (its temporary copy is
# complete: what a crash between the write and the rename leaves).
KILLER = """
import os, signal, sys
kind, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = [0]
if kind == "after-log":
    from flowmatch import monitoring
    append = monitoring._append_metrics
    def _append(path, row):
        append(path, row)
        if row["step"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    monitoring._append_metrics = _append
else:
    rename = os.replace
    def _replace(src, dst, **kw):
        if os.path.basename(dst) == name:
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst, **kw)
    os.replace = _replace
from flowmatch.cli import run
sys.exit(run(sys.argv[4:]))
"""


def _killed(kind, name, nth, *argv):
    p = subprocess.run([sys.executable, "-c", KILLER, kind, name, str(nth), *map(str, argv)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])


@pytest.mark.parametrize("kind,name,nth,state_step", [
    ("after-log", "", 100, 80),  # between the checkpoints of steps 80 and 120
    ("replace", "trainer_state.pt", 3, 80),  # the trainer state of step 120 written, not yet renamed
    ("replace", "model.safetensors", 3, 120),  # step 120's trainer state in place, its weights not
], ids=["between-checkpoints", "before-state-rename", "between-checkpoint-files"])
def test_run_killed_anywhere_resumes_bit_identically(tmp_path, reference, kind, name, nth, state_step):
    killed = tmp_path / "killed"
    _killed(kind, name, nth, "train", "--out", killed, *ARGS)
    assert _step(killed) == state_step
    _train(killed, "--resume")
    _same_run(reference, killed)


def test_reflow_killed_during_pair_generation_resumes_to_the_same_student(tmp_path, reference):
    common = ["--pairs", "200", "--shard-size", "50", "--teacher-nfe", "4", "--steps", "20", "--batch-size", "32",
              "--no-progress", "--no-plots"]
    full = tmp_path / "full"
    p = subprocess.run([sys.executable, "-m", "flowmatch", "reflow", str(reference), "--out", str(full), *common],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    killed = tmp_path / "killed"
    # shard 2 computed and written to its temporary file, killed before the rename
    _killed("replace", "shard-00002.safetensors", 1, "reflow", reference, "--out", killed, *common)
    assert sorted(f.name for f in (killed / "pairs").glob("shard-*")) == ["shard-00000.safetensors",
                                                                         "shard-00001.safetensors"]
    p = subprocess.run([sys.executable, "-m", "flowmatch", "reflow", str(reference), "--out", str(killed), "--resume",
                        *common], env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    for f in sorted((full / "pairs").glob("shard-*.safetensors")):
        a, b = load_file(f), load_file(killed / "pairs" / f.name)
        assert torch.equal(a["z0"], b["z0"]) and torch.equal(a["z1"], b["z1"]), f.name
    _same_run(full, killed)
