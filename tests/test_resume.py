"""Kill a training process with SIGKILL and resume it: the weights end bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time

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


def test_killed_run_resumes_bit_identically(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _train(ref)
    p = _train(killed, wait=False)
    deadline = time.time() + 300
    while _step(killed) < 80 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    at_kill = _step(killed)
    assert 80 <= at_kill < 240, "the run should be killed mid-way"
    _train(killed, "--resume")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ref / name), load_file(killed / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    steps_ref = [json.loads(ln)["step"] for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    steps_killed = [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps_killed == steps_ref
    loss_ref = [json.loads(ln)["loss"] for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    loss_killed = [json.loads(ln)["loss"] for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert loss_killed == loss_ref
