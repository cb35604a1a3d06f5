"""Export a run's whole K-step sampler, noise in and sample out (data units), as one ONNX graph:
the deployable artefact of a one-step generator, and of any run at a fixed NFE.

The sampler is written out step by step (Euler, or midpoint: two evaluations per step) on the
grid ``t_k = k / K`` that :func:`flowmatch.solvers.integrate` uses, so the graph computes what
``flowmatch sample RUN --nfe K`` computes; MeanFlow and shortcut runs take each step's average
velocity, and a label with a guidance weight is baked in. Exported by ``torch.onnx.export``
(needs ``pip install 'flowmatch[export]'``: onnx, onnxscript, onnxruntime) with a dynamic batch
size, and checked against PyTorch in onnxruntime.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .errors import SettingError, UserError
from .files import atomic_path
from .seeding import noise

SOLVERS = {"euler": 1, "midpoint": 2}


class Sampler(nn.Module):
    """``forward(z) -> sample``: ``z`` the noise (B, *shape) at t = 0, the sample in data units."""

    def __init__(self, run, nfe: int, solver: str = "euler", label: int | None = None, guidance: float = 1.0):
        super().__init__()
        import copy

        from .sampling import SampleOptions, check

        if solver not in SOLVERS:
            raise SettingError("solver", f"export writes fixed-step samplers, {' or '.join(SOLVERS)}; got {solver!r}")
        if nfe < 1 or nfe % SOLVERS[solver]:
            raise SettingError("nfe", f"{solver} takes a multiple of {SOLVERS[solver]} evaluations, got {nfe}")
        if run.interval and solver != "euler":
            raise SettingError("solver", f"a {run.cfg.objective} run steps by its average velocity: use euler")
        if run.cond_dim:
            raise UserError(f"{run.dir}: takes condition vectors, which the exported sampler does not take yet; "
                            "sample it with condition vectors instead")
        check(run, SampleOptions(nfe=nfe, solver=solver, label=label, guidance=guidance))
        # a CPU copy of the network: the caller's run stays on its device
        self.model, self.interval = copy.deepcopy(run.model).cpu(), run.interval
        self.steps, self.solver, self.guidance = nfe // SOLVERS[solver], solver, float(guidance)
        self.register_buffer("label", torch.tensor(-2 if label is None else int(label)), persistent=False)
        self.has_label = label is not None
        self.register_buffer("mean", run.dataset.mean.float().clone(), persistent=False)
        self.register_buffer("std", run.dataset.std.float().clone(), persistent=False)

    def velocity(self, x, t, h):
        from .solvers import guided

        def v(x, tt, label=None):
            kw = {"h": torch.full_like(tt, h)} if self.interval else {}
            return self.model(x, tt, label, **kw) if label is not None else self.model(x, tt, **kw)

        tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        if not self.has_label:
            return v(x, tb)
        return guided(v, self.label.expand(x.shape[0]), self.guidance)(x, tb)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x, dt = z, 1.0 / self.steps
        for k in range(self.steps):
            t = k * dt
            if self.solver == "euler":
                x = x + dt * self.velocity(x, t, dt)
            else:
                half = x + 0.5 * dt * self.velocity(x, t, 0.0)
                x = x + dt * self.velocity(half, t + 0.5 * dt, 0.0)
        return x * self.std + self.mean


def export_onnx(run, out, nfe: int, solver: str = "euler", label: int | None = None, guidance: float = 1.0,
                check: int = 256, seed: int = 0) -> dict:
    """Write ``run``'s ``nfe``-step sampler to ``out`` (.onnx) and check it in onnxruntime against
    PyTorch on ``check`` noise draws; returns the file size, the largest difference and
    onnxruntime's samples per second."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime (pip install 'flowmatch[export]')") from None
    out = Path(out)
    if nfe is None or nfe < 1:
        raise SettingError("nfe", f"expected a positive number of evaluations, got {nfe}")
    sampler = Sampler(run, nfe, solver, label, guidance).cpu().eval()
    z = torch.randn(4, *run.shape)  # a batch to trace with (its size is dynamic in the graph)
    with torch.no_grad():
        # optimize=False: onnxscript's constant folding fails on some graphs (a split in the interval MLP)
        program = torch.onnx.export(sampler, (z,), dynamo=True, optimize=False, input_names=["noise"], output_names=["sample"],
                                    dynamic_shapes={"z": {0: torch.export.Dim.DYNAMIC}}, verbose=False)
    with atomic_path(out) as tmp:  # a temporary file of its own: two exports never share one
        program.save(str(tmp))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    zc = noise(seed, 0, check, run.shape)
    with torch.no_grad():
        expected = sampler(zc).numpy()
    got = session.run(None, {"noise": zc.numpy()})[0]
    t0 = time.perf_counter()
    session.run(None, {"noise": zc.numpy()})
    per_s = check / (time.perf_counter() - t0)
    return {"out": str(out), "bytes": out.stat().st_size, "max_abs_diff": float(abs(got - expected).max()),
            "samples_per_s": per_s, "nfe": nfe, "solver": solver}
