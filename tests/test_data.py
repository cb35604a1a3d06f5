import numpy as np
import pytest
import torch

from flowmatch.data import ArrayDataset, ToyDataset, make_dataset, spec_from_arg
from flowmatch.data.arrays import load_array
from flowmatch.data.toy2d import TOY2D, checkerboard
from flowmatch.errors import UserError


def _notebook_membership(x, y):
    """The notebook's rule: cell (i, j) of a 4x4 board on [-4, 4]^2 kept when checkerboard[j, i] == 1."""
    board = np.indices((4, 4)).sum(axis=0) % 2
    i = int((x + 4) / 8 * 4)
    j = int((y + 4) / 8 * 4)
    return board[j, i] == 1


def test_checkerboard_matches_the_notebook_definition():
    pts = checkerboard(20000, torch.Generator().manual_seed(0)).numpy()
    assert ((pts >= -4) & (pts < 4)).all()
    assert all(_notebook_membership(x, y) for x, y in pts[:5000])
    # the 8 admissible cells are equally likely (chi-square, 7 dof: 99.9% quantile 24.3)
    i = np.floor((pts[:, 0] + 4) / 2).astype(int)
    j = np.floor((pts[:, 1] + 4) / 2).astype(int)
    counts = np.bincount(i * 4 + j, minlength=16)
    admissible = [c for c in range(16) if (c // 4 + c % 4) % 2 == 1]
    assert counts[[c for c in range(16) if c not in admissible]].sum() == 0
    expected = len(pts) / 8
    chi2 = (((counts[admissible] - expected) ** 2) / expected).sum()
    assert chi2 < 24.3
    # uniform inside a cell: the fractional positions have mean 1/2 and variance 1/12
    frac = ((pts + 4) / 2) % 1
    assert abs(frac.mean() - 0.5) < 0.01 and abs(frac.var() - 1 / 12) < 0.005


@pytest.mark.parametrize("name", list(TOY2D))
def test_toys_are_deterministic_for_a_generator(name):
    a = TOY2D[name](500, torch.Generator().manual_seed(3))
    b = TOY2D[name](500, torch.Generator().manual_seed(3))
    c = TOY2D[name](500, torch.Generator().manual_seed(4))
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() < 6


def test_fixed_point_set_is_the_notebooks():
    ds = ToyDataset("checkerboard", n_points=1000, seed=0)
    assert ds.points.shape == (1000, 2)
    batch = ds.sample(4096, torch.Generator().manual_seed(1)).x1
    # every training point comes from the fixed set
    d = torch.cdist(batch, ds.points, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert d.max() == 0
    assert torch.equal(ToyDataset("checkerboard", n_points=1000, seed=0).points, ds.points)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UserError, match="checkerboard, moons, 8gaussians, spirals, rings"):
        spec_from_arg("swissroll")


def test_arrays_load_and_standardise(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(5, 3, size=(200, 4))
    np.save(tmp_path / "a.npy", arr)
    np.savetxt(tmp_path / "a.csv", arr, delimiter=",", header="a,b,c,d", comments="")
    torch.save(torch.from_numpy(arr), tmp_path / "a.pt")
    for f in ("a.npy", "a.csv", "a.pt"):
        ds = make_dataset(spec_from_arg(str(tmp_path / f)))
        assert ds.shape == (4,)
        x = ds.sample(5000, torch.Generator().manual_seed(0)).x1
        assert abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1
        torch.testing.assert_close(ds.decode(ds.encode(torch.from_numpy(arr).float())), torch.from_numpy(arr).float())
    # a run rebuilt from the saved spec needs no recomputation
    spec = ArrayDataset(str(tmp_path / "a.npy")).spec
    again = make_dataset(spec)
    torch.testing.assert_close(again.mean, torch.from_numpy(arr.mean(0)).float())


def _write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(p, content, allow_pickle=True)
    else:
        p.write_text(content)
    return p


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("nan.npy", np.array([[1.0, np.nan], [2.0, 3.0]]), "NaN or Inf"),
        ("inf.csv", "1,2\n3,inf\n", "NaN or Inf"),
        ("empty.csv", "", "empty"),
        ("header.csv", "a,b\n", "no rows"),
        ("text.csv", "1,2\n3,x\n", "not numeric"),
        ("ragged.csv", "1,2\n3\n", "columns"),
        ("vector.npy", np.arange(5.0), "2 dimensions"),
        ("onerow.npy", np.ones((1, 3)), "at least 2 rows"),
        ("objects.npy", np.array([{"a": 1}, {"b": 2}], dtype=object), "numeric"),
        ("strings.npy", np.array([["a", "b"], ["c", "d"]]), "expected real numbers"),
        ("complex.npy", np.ones((3, 2), dtype=np.complex64), "expected real numbers"),
        ("huge.csv", "1,2\n3,1e300\n", "beyond float32's range"),
        ("huge.npy", np.array([[1.0, 2.0], [-1e300, 0.0]]), "beyond float32's range"),
        ("bad.npy", "not an npy file", "not a readable"),
        ("bad.pt", "garbage", "weights_only"),
        ("data.txt", "1,2\n", "unsupported file type"),
    ],
)
def test_bad_arrays_name_the_file(tmp_path, name, content, message):
    p = _write(tmp_path, name, content)
    with pytest.raises(UserError, match=message) as e:
        load_array(str(p))
    assert str(p) in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.float64])
def test_real_tensors_of_any_precision_become_float32(tmp_path, dtype):
    t = torch.tensor([[1.0, 2.0], [3.0, 250.0], [0.0, 8.0]]).to(dtype)
    torch.save(t, tmp_path / "d.pt")
    x = load_array(str(tmp_path / "d.pt"))
    assert x.dtype == torch.float32
    assert torch.equal(x, t.float())


@pytest.mark.parametrize("dtype", [np.float16, np.int16, np.uint32, np.bool_])
def test_real_npy_of_any_precision_becomes_float32(tmp_path, dtype):
    a = np.array([[1, 0], [0, 1], [1, 1]]).astype(dtype)
    np.save(tmp_path / "d.npy", a)
    x = load_array(str(tmp_path / "d.npy"))
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(a.astype(np.float32)))


def test_complex_tensor_is_refused(tmp_path):
    torch.save(torch.ones(3, 2, dtype=torch.complex64), tmp_path / "c.pt")
    with pytest.raises(UserError, match="expected real numbers"):
        load_array(str(tmp_path / "c.pt"))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_array(str(tmp_path / "nope.npy"))


def test_a_student_of_a_student_is_evaluated_on_the_original_data():
    """A distilled 2-RF run's data are pairs of pairs of the checkerboard: eval and its
    sharpness measures see the checkerboard."""
    from flowmatch.data import eval_dataset

    spec = {"name": "pairs", "dir": "d/pairs",
            "base": {"name": "pairs", "dir": "r/pairs", "base": {"name": "checkerboard", "n_points": None, "seed": 0}}}
    ds = eval_dataset(spec)
    assert isinstance(ds, ToyDataset) and ds.name == "checkerboard"
