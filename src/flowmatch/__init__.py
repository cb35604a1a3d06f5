"""flowmatch: flow-matching generative models — train a velocity field ``v(x, t)``, sample
it with any ODE solver, straighten it with reflow and distil it to one step.

Time convention: ``t = 0`` is noise, ``t = 1`` is data (see :mod:`flowmatch.paths`).

The building blocks for a loop of your own are exported here (imported on first use, so that
``import flowmatch`` and the command line stay fast)::

    import flowmatch as fm

    cfm = fm.CFM(coupling=fm.OTCoupling())          # path, time sampler, coupling
    s = cfm.sample(x1, generator=g)                 # s.x_t, s.t, s.u_t
    loss = ((model(s.x_t, s.t) - s.u_t) ** 2).mean()
    x = fm.integrate(model, torch.randn(n, d), "midpoint", nfe=20).x
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowmatch")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

#: exported name -> the module that defines it
_EXPORTS = {
    # paths and their interfaces
    "AffinePath": "paths", "LinearPath": "paths", "CosinePath": "paths", "VPPath": "paths", "PathSample": "paths",
    "marginal_velocity": "paths", "posterior_mean": "paths",
    "Path": "protocols", "TimeSampler": "protocols", "Coupling": "protocols",
    # time samplers and couplings
    "UniformTime": "timesteps", "LogitNormalTime": "timesteps", "UShapedTime": "timesteps", "GridTime": "timesteps",
    "IndependentCoupling": "couplings", "OTCoupling": "couplings",
    # objectives
    "CFM": "objectives", "MeanFlow": "objectives", "MeanFlowOptions": "objectives", "Shortcut": "objectives",
    "Loss": "objectives", "cfm_loss": "objectives", "stable_target": "objectives",
    # networks and data
    "MLP": "models.mlp", "UNet": "models.unet", "Condition": "models.cond", "DataPrediction": "models", "make_model": "models",
    "Batch": "data", "checkerboard": "data.toy2d",
    # sampling, guidance, likelihood
    "integrate": "solvers", "integrate_sde": "solvers", "flow_map": "solvers", "guided": "solvers",
    "SolveResult": "solvers", "log_prob": "likelihood", "SampleOptions": "sampling",
    # measures
    "w2": "metrics", "off_support": "metrics", "prdc": "metrics", "evaluate": "metrics",
    # runs, training, teachers, reflow
    "TrainConfig": "config", "StudentOptions": "config", "train": "training",
    "Run": "runs", "load": "runs", "load_run": "runs", "save_pretrained": "runs",
    "FlowTeacher": "teachers", "DiffusersTeacher": "teachers", "distill": "reflow",
    # modules (``flowmatch.reflow`` stays the module: its ``reflow`` function is ``flowmatch.reflow.reflow``)
    "reflow": None, "seeding": None, "UserError": "errors", "SettingError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flowmatch' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = importlib.import_module(f".{name}" if module is None else f".{module}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
