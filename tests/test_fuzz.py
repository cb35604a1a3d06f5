"""Property-based checks of the command line's contract (hypothesis, derandomized: see the
profiles in conftest.py).

For generated data files, CSV text, damaged run directories and option values, the command
either succeeds (legitimate input) or exits with status 2 and exactly one line on stderr, no
traceback, and nothing written or overwritten. Training budgets are tiny: these tests are
about input, not quality.
"""

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import TRAIN_TINY, one_line_error

TINY_TRAIN = [*TRAIN_TINY, "--log-every", "1"]


def _tree(path) -> dict:
    """Every file under ``path`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).rglob("*") if p.is_file()}


def _contract(rc, err, legit: bool | None = None) -> bool:
    """Status 0, or the one-line refusal; ``legit`` (when known) says which. Returns success."""
    assert "Traceback" not in err, err
    if legit is True:
        assert rc == 0, err
    if rc != 0:
        assert legit is not True
        one_line_error(rc, err)
    return rc == 0


@pytest.fixture
def scratch():
    """A fresh folder per example (hypothesis runs many examples in one test call)."""
    dirs = []

    def make():
        dirs.append(Path(tempfile.mkdtemp(prefix="flowmatch-fuzz-")))
        return dirs[-1]

    yield make
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


# --- data files ----------------------------------------------------------------------------

REAL_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_]
FLOATS = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e300, -1e300, 3e38, 1e-45]))


@st.composite
def tables(draw):
    """(array, legitimate?) of a real or refused dtype, 1 to 3 dimensions, values incl. NaN/Inf/huge."""
    kind = draw(st.sampled_from(["real", "real", "real", "complex", "text"]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6))
    if kind == "text":
        return np.full(shape, "a"), False
    if kind == "complex":
        return np.ones(shape, dtype=np.complex64), False
    dtype = draw(st.sampled_from(REAL_DTYPES))
    if np.dtype(dtype).kind == "f":
        values = draw(hnp.arrays(np.float64, shape, elements=FLOATS))
        with np.errstate(over="ignore", invalid="ignore"):
            arr = values.astype(dtype)
    else:
        arr = draw(hnp.arrays(dtype, shape))
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(arr.astype(np.float32)).all()
    legit = arr.ndim == 2 and arr.shape[0] >= 2 and arr.shape[1] >= 1 and bool(finite)
    return arr, legit


@given(table=tables(), suffix=st.sampled_from([".npy", ".pt", ".pt-bfloat16"]))
@example(table=(np.ones((4, 2)), True), suffix=".pt-bfloat16")
@example(table=(np.array([[1.0, 2.0], [1e300, 0.0], [3.0, 4.0]]), False), suffix=".npy")
def test_generated_arrays_train_or_are_refused(cli, scratch, table, suffix):
    arr, legit = table
    d = scratch()
    f = d / "data.npy" if suffix == ".npy" else d / "data.pt"
    if suffix == ".npy":
        np.save(f, arr)
    elif arr.dtype.kind in "U":
        torch.save(["a"] * len(arr), f)  # not a tensor
    elif arr.dtype.kind == "c":
        torch.save(torch.from_numpy(arr), f)
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr.astype(np.float64) if arr.dtype == np.uint32 else arr))
        if suffix == ".pt-bfloat16":  # a dtype NumPy does not have; out of its range becomes Inf
            t = t.to(torch.bfloat16)
            legit = legit and bool(torch.isfinite(t.float()).all())
        torch.save(t, f)
    rc, _, err = cli("train", "--data", f, "--out", d / "run", *TINY_TRAIN)
    if _contract(rc, err, legit):
        assert (d / "run" / "ema.safetensors").is_file()
    else:
        assert not (d / "run").exists()


NUMBER = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
                   st.integers(-10**6, 10**6).map(str))
ODD = st.sampled_from(["nan", "inf", "-inf", "1e300", "-1e39", "", " ", "x", "0x10", "1e", "  2.5 "])


@st.composite
def csv_rows(draw):
    """Mostly numeric rows of one width; sometimes an odd token or a ragged row."""
    width = draw(st.integers(1, 3))
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        w = width if draw(st.integers(0, 9)) else draw(st.integers(1, 4))
        rows.append([draw(NUMBER) if draw(st.integers(0, 5)) else draw(ODD) for _ in range(w)])
    return rows


@given(rows=csv_rows(), header=st.booleans())
@example(rows=[["1", "2"], ["1e300", "3"], ["4", "5"]], header=False)
@example(rows=[["1"], ["2"], ["3"]], header=True)
def test_generated_csv_trains_or_is_refused(cli, scratch, rows, header):
    d = scratch()
    f = d / "data.csv"
    lines = ([",".join(f"c{k}" for k in range(len(rows[0])))] if header and rows else []) + [",".join(r) for r in rows]
    f.write_text("\n".join(lines))
    rc, _, err = cli("train", "--data", f, "--out", d / "run", *TINY_TRAIN)
    if not _contract(rc, err):
        assert not (d / "run").exists()


# --- run directories -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    """A tiny checkerboard run that draws no pictures (resuming it is cheap)."""
    from flowmatch.cli import run

    out = tmp_path_factory.mktemp("fuzz") / "run"
    assert run(["train", "--out", str(out), "--checkpoint-every", "2", *TINY_TRAIN]) == 0
    return out


def _copy(run: Path, d: Path) -> Path:
    dst = d / "run"
    shutil.copytree(run, dst)
    return dst


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 600), st.text(max_size=5),
    st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-2, 9), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
CONFIG_PATHS = (
    [("format_version",), ("shape",), ("num_classes",), ("data",), ("train",), ("data", "name"), ("data", "seed"),
     ("data", "n_points"), ("train", "lineage"), ("train", "lineage", "steps"), ("train", "lineage", "kind")]
    + [("train", k) for k in ("width", "depth", "model", "lr", "steps", "path", "sigma_min", "time_dist", "schedule",
                              "ema_decay", "n_points", "seed", "coupling", "precision", "batch_size", "grad_clip")]
)


@st.composite
def config_mutations(draw):
    """A list of (path, action, value): set a key to a value of any JSON type, delete it, or add an extra key."""
    out = []
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(CONFIG_PATHS))
        action = draw(st.sampled_from(["set", "set", "delete", "extra"]))
        out.append((path, action, draw(JSON_VALUES)))
    return out


def _mutate(doc: dict, mutations) -> dict:
    for path, action, value in mutations:
        node = doc
        for key in path[:-1]:
            if not isinstance(node, dict):
                break
            node = node.setdefault(key, {})
        if not isinstance(node, dict):
            continue
        if action == "set":
            node[path[-1]] = value
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node["extra_" + path[-1]] = value
    return doc


@given(mutations=config_mutations())
@example(mutations=[(("num_classes",), "set", "x")])
@example(mutations=[(("train", "lineage"), "set", {"kind": "distill", "steps": "x"})])
@example(mutations=[(("train", "width"), "set", -6)])
def test_mutated_config_json_samples_or_is_refused(cli, fuzz_run, scratch, mutations):
    d = scratch()
    run = _copy(fuzz_run, d)
    doc = _mutate(json.loads((run / "config.json").read_text()), mutations)
    (run / "config.json").write_text(json.dumps(doc))
    before = _tree(run)
    rc, _, err = cli("sample", run, "--n", "5", "--nfe", "1", "--out", d / "x.npy", "--no-progress")
    if _contract(rc, err):
        assert np.load(d / "x.npy").shape[0] == 5
    else:
        assert not (d / "x.npy").exists()
        assert _tree(run) == before


@given(name=st.sampled_from(["config.json", "metrics.jsonl", "ema.safetensors", "trainer_state.pt"]),
       cut=st.floats(0.0, 1.0, exclude_max=True), command=st.sampled_from(["sample", "resume"]))
@example(name="metrics.jsonl", cut=0.9, command="resume")
def test_truncated_files_are_used_or_refused(cli, fuzz_run, scratch, name, cut, command):
    d = scratch()
    run = _copy(fuzz_run, d)
    data = (run / name).read_bytes()
    (run / name).write_bytes(data[: int(len(data) * cut)])
    legit = name == "metrics.jsonl" or (name, command) in (("trainer_state.pt", "sample"), ("ema.safetensors", "resume"))
    before = _tree(run)
    if command == "sample":
        rc, _, err = cli("sample", run, "--n", "4", "--nfe", "1", "--out", d / "x.npy", "--no-progress")
    else:
        rc, _, err = cli("train", "--resume", "--out", run, "--no-progress")
    if not _contract(rc, err, legit):  # a cut metrics.jsonl ends in a torn line, which is skipped
        assert _tree(run) == before and not (d / "x.npy").exists()


# --- option values -------------------------------------------------------------------------

def _value(draw, kind):
    if kind == "int":
        return str(draw(st.integers(-3, 40)))
    if kind == "float":
        return draw(st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e-3", "0.5", "2", "1e300"]))
    return draw(st.text(alphabet="abc01-.,e", min_size=0, max_size=4))


SAMPLE_OPTIONS = {"--n": "int", "--nfe": "int", "--solver": "name", "--tol": "float", "--guidance": "float",
                  "--label": "int", "--batch-size": "int", "--seed": "int", "--weights": "name"}
SOLVERS = ["euler", "midpoint", "heun", "rk4", "dopri5", "bosh3", "leapfrog"]


@st.composite
def sample_argv(draw):
    argv = []
    for option in draw(st.lists(st.sampled_from(sorted(SAMPLE_OPTIONS)), max_size=4, unique=True)):
        kind = SAMPLE_OPTIONS[option]
        if option == "--solver":
            value = draw(st.sampled_from(SOLVERS))
        elif option == "--weights":
            value = draw(st.sampled_from(["ema", "model", "best"]))
        elif option == "--tol":  # tighter than float32 can reach is not this test's subject
            value = draw(st.sampled_from(["0", "-1", "nan", "inf", "1e-3", "0.5", "2", "x"]))
        else:
            value = _value(draw, draw(st.sampled_from([kind, kind, "text"])))
        argv += [option, value]
    return argv


@given(argv=sample_argv(), out=st.sampled_from(["x.npy", "x.png", "x.txt", "missing/x.npy", "dir.npy", "exists.npy"]))
@example(argv=["--tol", "0", "--solver", "dopri5"], out="x.npy")
@example(argv=["--guidance", "nan"], out="x.npy")
@example(argv=[], out="dir.npy")
def test_sample_options_work_or_are_refused(cli, fuzz_run, scratch, argv, out):
    d = scratch()
    (d / "dir.npy").mkdir()
    (d / "exists.npy").write_bytes(b"keep")
    before = _tree(d)
    rc, _, err = cli("sample", fuzz_run, "--out", d / out, "--no-progress", *argv)
    if _contract(rc, err):
        assert (d / out).is_file() and out not in ("exists.npy", "dir.npy")
    else:
        assert _tree(d) == before


TRAIN_OPTIONS = {"--lr": "float", "--width": "int", "--depth": "int", "--batch-size": "int", "--steps": "int",
                 "--warmup-steps": "int", "--sigma-min": "float", "--ema-decay": "float", "--grad-clip": "float",
                 "--time-std": "float", "--label-dropout": "float", "--log-every": "int", "--weight-decay": "float",
                 "--checkpoint-every": "int", "--grad-accum": "int", "--n-points": "int", "--stf": "int"}


@st.composite
def train_argv(draw):
    argv = []
    for option in draw(st.lists(st.sampled_from(sorted(TRAIN_OPTIONS)), min_size=1, max_size=3, unique=True)):
        kind = TRAIN_OPTIONS[option]
        argv += [option, _value(draw, draw(st.sampled_from([kind, kind, "text"])))]
    return argv


@given(options=train_argv())
@example(options=["--lr", "inf"])
@example(options=["--width", "33"])
def test_train_options_work_or_are_refused(cli, scratch, options):
    d = scratch()
    argv = list(TINY_TRAIN)
    for option, value in zip(options[::2], options[1::2]):
        if option == "--steps" and value.isdigit():
            value = str(min(int(value), 4))
        argv += [option, value]
    rc, _, err = cli("train", "--out", d / "run", *argv)
    if _contract(rc, err):
        assert (d / "run" / "ema.safetensors").is_file()
    else:
        assert not (d / "run").exists()


def test_the_profile_is_bounded():
    """The suite's own budget: derandomized and bounded unless a profile says otherwise."""
    s = settings()
    assert s.derandomize or os.environ.get("HYPOTHESIS_PROFILE")
    assert s.max_examples <= 200 and math.isfinite(s.max_examples)
