import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def image_cache(tmp_path_factory):
    """The decoded-image cache of every test, in a temporary folder (not the user's ~/.cache)."""
    folder = tmp_path_factory.mktemp("image-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWMATCH_IMAGE_CACHE", str(folder))
        yield folder


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


def one_line_error(rc, err):
    """Bad input: exit status 2 and exactly one line on stderr, no traceback; returns the line."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("flowmatch: error:"), err
    assert "Traceback" not in err
    return lines[0]


TINY = ["--width", "32", "--depth", "2", "--no-progress"]


def copy_run(src, dst):
    """A writable copy of a run directory's files (for tests that damage it)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


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
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    d = tmp_path_factory.mktemp("ddpm") / "pipe"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(d)
    return d
