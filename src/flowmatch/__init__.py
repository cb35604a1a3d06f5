"""flowmatch: flow-matching generative models — train a velocity field ``v(x, t)``, sample
it with any ODE solver, straighten it with reflow and distil it to one step.

Time convention: ``t = 0`` is noise, ``t = 1`` is data (see :mod:`flowmatch.paths`).
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import UserError  # noqa: E402
from .paths import CosinePath, LinearPath, PathSample, VPPath, marginal_velocity  # noqa: E402
from .runs import load, save_pretrained  # noqa: E402
from .solvers import SolveResult, integrate  # noqa: E402

__all__ = [
    "__version__",
    "TrainConfig",
    "UserError",
    "load",
    "save_pretrained",
    "LinearPath",
    "VPPath",
    "CosinePath",
    "PathSample",
    "marginal_velocity",
    "integrate",
    "SolveResult",
]
