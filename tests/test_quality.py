"""End-to-end quality of the default setup (slow: minutes; CI runs it)."""

import subprocess
import sys
import time

import pytest

from flowmatch.metrics import evaluate
from flowmatch.runs import load_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "default"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "flowmatch", "train", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    return out, wall


def test_default_train_is_under_five_minutes(default_run):
    _, wall = default_run
    assert wall < 300, f"default flowmatch train took {wall:.0f} s"


def test_default_quality_on_fresh_data(default_run):
    out, _ = default_run
    run = load_run(out)
    euler = evaluate(run, (100,), seed=123, solver="euler", adaptive=None)
    mid = evaluate(run, (8, 16), seed=123, solver="midpoint", adaptive=None)
    assert euler["nfe"]["100"]["ratio"] <= 1.3, euler
    assert mid["nfe"]["8"]["ratio"] <= 1.5, mid  # 8 evaluations (4 midpoint steps)
    assert mid["nfe"]["16"]["ratio"] <= 1.5, mid  # 8 midpoint steps
