import os
from pathlib import Path

import pytest
import torch

from helpers import TINY, tiny_ddpm

if os.environ.get("PYTEST_XDIST_WORKER"):  # several workers share the cores: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory):
    """No test reads or writes the user's home: HOME, the XDG folders, matplotlib's folder and
    every flowmatch cache (the image cache, the classifier and FID caches) point into one temporary
    folder for the session, for the tests and the processes they start."""
    # one folder for the session's workers (pytest-xdist): a cached classifier is trained once
    base = tmp_path_factory.getbasetemp()
    home = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "home"
    home.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        for name, sub in (("HOME", ""), ("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"),
                          ("MPLCONFIGDIR", ".config/matplotlib"), ("HF_HOME", ".cache/huggingface"),
                          ("FLOWMATCH_CACHE", ".cache/flowmatch"), ("FLOWMATCH_IMAGE_CACHE", ".cache/flowmatch/images")):
            (home / sub).mkdir(parents=True, exist_ok=True)
            mp.setenv(name, str(home / sub))
        yield home


@pytest.fixture
def cli(capsys):
    """Run the command line in-process: returns (exit status, stdout, stderr)."""
    from flowmatch.cli import run

    def call(*args):
        capsys.readouterr()
        rc = run([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return call


@pytest.fixture
def script(capsys):
    """Run ``python benchmarks/NAME.py ARGS`` in-process, as :func:`cli` runs the command line (one
    start-up and one set of imports for all the calls): returns (exit status, stdout, stderr).
    ``SystemExit("message")`` is status 1 with the message on stderr, as Python reports it."""
    import runpy
    import sys

    def call(path, *args):
        capsys.readouterr()
        argv, syspath = sys.argv, list(sys.path)
        sys.argv, sys.path[:0] = [str(path), *map(str, args)], [str(Path(path).parent)]  # as `python path` sets them
        try:
            runpy.run_path(str(path), run_name="__main__")
            rc = 0
        except SystemExit as e:
            rc = e.code or 0
            if not isinstance(rc, int):
                print(rc, file=sys.stderr)
                rc = 1
        finally:
            sys.argv, sys.path[:] = argv, syspath
        out, err = capsys.readouterr()
        return rc, out, err

    return call


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A small trained checkerboard run shared by read-only tests."""
    from flowmatch.cli import run

    out = tmp_path_factory.mktemp("runs") / "tiny"
    rc = run(["train", "--steps", "60", "--batch-size", "128", "--checkpoint-every", "30", "--out", str(out), *TINY])
    assert rc == 0
    return out


# Property-based tests (tests/test_fuzz.py): derandomized, so CI sees the same examples every
# run, and bounded so that the whole file runs in a few minutes on 2 CPU cores.
# HYPOTHESIS_PROFILE=thorough draws more (and fresh) examples locally; =examples runs only the
# pinned @example cases (the reports), in seconds.
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("examples", phases=[Phase.explicit], deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    """A tiny, untrained diffusers DDPM pipeline saved the usual way."""
    return tiny_ddpm(tmp_path_factory.mktemp("ddpm") / "pipe")


class Claims:
    """The documented claims a quality test checks: each :meth:`check` records the claim, the
    measured value, the bound and the page that states it (shown in the table the run prints at
    its end, see :func:`pytest_terminal_summary`); :meth:`verify` fails the test if any missed."""

    def __init__(self, node):
        self.node, self.missed = node, []

    def check(self, claim: str, value: float, op: str, bound: float, page: str) -> bool:
        ok = value <= bound if op == "<=" else value >= bound
        self.node.user_properties.append(("claim", {"claim": claim, "value": value, "op": op, "bound": bound,
                                                    "page": page, "ok": ok}))
        if not ok:
            self.missed.append(f"{claim}: {value:.4g} is not {op} {bound:.4g} ({page})")
        return ok

    def verify(self) -> None:
        assert not self.missed, "; ".join(self.missed)


@pytest.fixture
def claims(request):
    return Claims(request.node)


def pytest_terminal_summary(terminalreporter):
    """After a run with quality tests: one table of the claims checked, pass or fail (the tests'
    reports carry them, so the table is whole under pytest-xdist too)."""
    rows = [value for reports in terminalreporter.stats.values() for r in reports
            for key, value in getattr(r, "user_properties", ()) if key == "claim" and getattr(r, "when", "call") == "call"]
    if not rows:
        return
    terminalreporter.section("claims checked")
    width = max(len(r["claim"]) for r in rows)
    for r in rows:
        terminalreporter.write_line(f"{'pass' if r['ok'] else 'FAIL'}  {r['claim']:<{width}}  {r['value']:10.4g} {r['op']} "
                                    f"{r['bound']:<8.4g}  {r['page']}")


def pytest_collection_modifyitems(items):
    """The slow tier first: with two workers the long quality runs start at once and the short tests
    fill in behind them (a long test started last keeps one worker busy while the other idles)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
