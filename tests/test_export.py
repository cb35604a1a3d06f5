"""flowmatch export: the whole K-step sampler as ONNX, run in onnxruntime against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowmatch.runs import load_run

from helpers import TINY, one_line_error

ort = pytest.importorskip("onnxruntime", reason="flowmatch[export] is not installed")


def run_onnx(path, z: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"noise": z.numpy()})[0]


@pytest.mark.parametrize("solver, nfe", [("euler", 4), ("midpoint", 6)])
def test_exported_sampler_equals_the_pytorch_sampler(cli, tiny_run, tmp_path, solver, nfe):
    out = tmp_path / "gen.onnx"
    rc, stdout, err = cli("export", tiny_run, "--nfe", nfe, "--solver", solver, "--out", out, "--json")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["bytes"] == out.stat().st_size and res["max_abs_diff"] < 1e-4 and (res["nfe"], res["solver"]) == (nfe, solver)
    run = load_run(tiny_run, device="cpu")
    for n in (1, 37):  # the batch size is dynamic
        z = torch.randn(n, 2, generator=torch.Generator().manual_seed(n))
        expected = run.flow(z, nfe, solver).x  # torchdiffeq's fixed-grid solver, decoded
        np.testing.assert_allclose(run_onnx(out, z), expected.numpy(), atol=1e-4, rtol=1e-4)


def test_a_one_step_generator_and_a_guided_unet_export(cli, tmp_path):
    """MeanFlow at its one step (the average velocity over [0, 1]); a class-conditional UNet on
    digits with guidance baked in, against Run.flow with the same label and weight."""
    mf = tmp_path / "mf"
    rc, _, err = cli("train", "--objective", "meanflow", "--steps", "20", "--batch-size", "64", "--out", mf,
                     "--no-plots", *TINY)
    assert rc == 0, err
    rc, _, err = cli("export", mf, "--out", tmp_path / "mf.onnx")  # the run's own NFE: 1
    assert rc == 0, err
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(run_onnx(tmp_path / "mf.onnx", z), load_run(mf, device="cpu").flow(z, 1).x.numpy(),
                               atol=1e-4, rtol=1e-4)

    digits = tmp_path / "digits"
    rc, _, err = cli("train", "--data", "digits", "--steps", "3", "--batch-size", "8", "--checkpoint-every", "3",
                     "--out", digits, "--no-plots", "--no-progress")
    assert rc == 0, err
    rc, _, err = cli("export", digits, "--nfe", "2", "--label", "3", "--guidance", "2", "--out", tmp_path / "d.onnx")
    assert rc == 0, err
    # a batch larger than the UNet's CPU chunk (392 8x8 images): PyTorch evaluates it in parts, the graph
    # (traced without them) whole
    z = torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = load_run(digits, device="cpu").flow(z, 2, label=3, guidance=2.0).x
    np.testing.assert_allclose(run_onnx(tmp_path / "d.onnx", z), expected.numpy(), atol=1e-4, rtol=1e-4)


def test_bad_export_input(cli, tiny_run, tmp_path):
    out = tmp_path / "gen.onnx"
    assert "--nfe" in one_line_error(*cli("export", tiny_run, "--nfe", "3", "--solver", "midpoint", "--out", out)[::2])
    assert "--solver" in one_line_error(*cli("export", tiny_run, "--solver", "dopri5", "--nfe", "4", "--out", out)[::2])
    assert "--out" in one_line_error(*cli("export", tiny_run, "--out", tmp_path / "gen.txt")[::2])
    assert not out.exists()
    out.write_bytes(b"keep")
    assert "--overwrite" in one_line_error(*cli("export", tiny_run, "--nfe", "2", "--out", out)[::2])
    assert out.read_bytes() == b"keep"
