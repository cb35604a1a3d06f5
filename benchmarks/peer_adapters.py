"""What benchmarks/peers.py's runner and report share: the rows, the quality measure (W2 against fresh
checkerboard draws over its floor, the share off the cells, precision/recall), and one function per peer
library that wraps the shared network in the library's own path/loss objects and sampler."""

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flowmatch.data.toy2d import checkerboard
from flowmatch.metrics import off_support, prdc, w2

ROWS = {"flowmatch": "flowmatch", "flowmatch-bf16": "flowmatch (bf16)", "flowmatch-bf16-compile": "flowmatch (bf16, compile)",
        "flowmatch-defaults": "flowmatch (defaults)", "flowmatch-distilled": "flowmatch (2-RF, distilled)",
        "torchcfm": "torchcfm", "torchcfm-ot": "torchcfm-ot", "flow_matching": "flow_matching (Meta)",
        "rectified-flow": "rectified-flow-pytorch", "flowmatch-meanflow": "flowmatch (MeanFlow)",
        "flowmatch-shortcut": "flowmatch (shortcut)", "rectified-flow-meanflow": "rectified-flow-pytorch (MeanFlow)",
        "rectified-flow-meanflow-recipe": "rectified-flow-pytorch (MeanFlow, flowmatch's recipe)"}  # --libs name: label
DEFAULT_LIBS = [k for k in ROWS if k not in ("flowmatch-bf16-compile", "rectified-flow-meanflow-recipe")]
# one-step generators trained from scratch: judged during training at one step, compared in their own table
FROM_SCRATCH_ONE_STEP = ("flowmatch-meanflow", "flowmatch-shortcut", "rectified-flow-meanflow", "rectified-flow-meanflow-recipe")
# a peer row trained by flowmatch's recipe for its objective (TrainConfig's batch, schedule, clipping, EMA)
RECIPE_ROWS = {"rectified-flow-meanflow-recipe": {"objective": "meanflow"}}
# rows trained as `flowmatch train` does for their objective (the recipes of flowmatch.config)
FM_DEFAULT_ROWS = {"flowmatch-defaults": {}, "flowmatch-meanflow": {"objective": "meanflow"},
                   "flowmatch-shortcut": {"objective": "shortcut"}}
# the speed rows: the notebook's network as the peers train it (raw coordinates in, velocity out)
PEERS_NET = {"fourier": 0, "prediction": "velocity"}
FM_SETTINGS = {"flowmatch": PEERS_NET, "flowmatch-bf16": {**PEERS_NET, "precision": "bf16"},
               "flowmatch-bf16-compile": {**PEERS_NET, "precision": "bf16", "compile": True}}
NFES, N_FINAL, SEED = (1, 2, 4, 8, 100), 4000, 0  # the NFE table, its samples; the training points use seed 0
REF_SEEDS, PARTNER_SEEDS = (1, 2, 3), (4, 5, 6)  # fresh draws


def eval_nfe(lib: str) -> int:
    """The NFE of the W2 evaluations during training (the time to the target)."""
    return 1 if lib in FROM_SCRATCH_ONE_STEP else 100


def draws(n: int, seeds) -> list[torch.Tensor]:
    return [checkerboard(n, torch.Generator().manual_seed(s)) for s in seeds]


def w2_floor(n: int) -> float:
    """Mean W2 between 3 pairs of independent ``n``-point draws of the continuous checkerboard."""
    return sum(w2(a, b) for a, b in zip(draws(n, REF_SEEDS), draws(n, PARTNER_SEEDS))) / len(REF_SEEDS)


class Quality:
    """W2 against the 3 reference draws of the sample's size, over the floor; % off the cells; precision/recall."""

    def __init__(self, floors: dict[int, float]):
        self.floors, self.refs = floors, {n: draws(n, REF_SEEDS) for n in floors}

    def __call__(self, x: torch.Tensor) -> dict:
        refs = self.refs[len(x)]
        d, pr = sum(w2(x, r) for r in refs) / len(refs), prdc(refs[0], x)
        return {"w2": d, "ratio": d / self.floors[len(x)], "off": off_support("checkerboard", x),
                "precision": pr["precision"], "recall": pr["recall"]}


def noise(n: int) -> torch.Tensor:
    """The sampling noise of every row: what ``Run.sample(n, seed=0)`` draws."""
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(SEED))


class PeerUnavailable(Exception):
    """The peer (or a part of it this benchmark needs) does not import here."""


@dataclass
class Peer:
    """A library's loss(noise, data, times), sampler(noise, nfe) and velocity (noise at 0; None: the network)."""

    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    sample: Callable[[torch.Tensor, int], torch.Tensor]
    notes: list[str] = field(default_factory=list)
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def peer_import(module: str, name: str, notes: list[str] | None = None):
    """``from module import name``, or PeerUnavailable; rectified_flow_pytorch with torchvision's placeholder."""
    if module == "rectified_flow_pytorch" and torchvision_placeholder() and notes is not None:
        notes.append("torchvision absent: inert placeholder modules stand in for it (used only by image helpers)")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - any import failure means: not available here
        raise PeerUnavailable(f"{module} does not import: {type(e).__name__}: {e}") from None


def torchvision_placeholder() -> bool:
    """rectified_flow_pytorch imports torchvision for image helpers this benchmark never calls; where it is absent
    (it does not import beside this torch), inert modules stand in for it in this process (calls raise)."""
    if importlib.util.find_spec("torchvision") is not None:
        return False

    def absent(*_, **__):
        raise ImportError("torchvision is not installed (placeholder from benchmarks/peer_adapters.py)")

    contents = {"torchvision": {}, "torchvision.utils": {"save_image": absent}, "torchvision.transforms": {},
                "torchvision.models": {"vgg16": absent, "VGG16_Weights": types.SimpleNamespace(DEFAULT=None)}}
    for name, attrs in contents.items():
        module = sys.modules[name] = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attrs)
        if "." in name:
            setattr(sys.modules["torchvision"], name.split(".")[1], module)
    return True


class TimeFirst(nn.Module):
    """torchdyn calls its vector field as ``f(t, x)`` with a scalar ``t``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, t, x, *args, **kwargs):
        return self.model(x, t.expand(len(x)))


def euler(model: nn.Module, x0: torch.Tensor, nfe: int) -> torch.Tensor:
    """The notebook's sampler: Euler on the grid ``t_k = k / K``."""
    x = x0.clone()
    for k in range(nfe):
        x = x + model(x, torch.full((len(x),), k / nfe)) / nfe
    return x


def torchcfm_peer(model: nn.Module, ot: bool = False) -> Peer:
    name = "ExactOptimalTransportConditionalFlowMatcher" if ot else "ConditionalFlowMatcher"
    fm = peer_import("torchcfm.conditional_flow_matching", name)(sigma=0.0)
    notes = [f"path/loss: {name}(sigma=0.0).sample_location_and_conditional_flow(x0, x1, t), MSE"
             + ("; exact OT plan per batch (POT emd), pairs drawn with numpy's global RNG (seeded 0)" if ot else "")]

    def loss(x0, x1, t):
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t)
        return F.mse_loss(model(xt, t), ut)

    try:  # torchcfm's examples sample with torchdyn's NeuralODE
        from torchdyn.core import NeuralODE
    except Exception as e:  # noqa: BLE001
        notes.append(f"sampler: plain Euler loop on t_k = k/K (torchdyn does not import: {type(e).__name__}: {e})")
        return Peer(loss, lambda x0, nfe: euler(model, x0, nfe), notes)
    node = NeuralODE(TimeFirst(model), solver="euler")
    notes.append("sampler: torchdyn NeuralODE(solver='euler').trajectory on t_span = linspace(0, 1, K + 1)")
    return Peer(loss, lambda x0, nfe: node.trajectory(x0, t_span=torch.linspace(0, 1, nfe + 1))[-1], notes)


def flow_matching_peer(model: nn.Module) -> Peer:
    path = peer_import("flow_matching.path", "AffineProbPath")(scheduler=peer_import("flow_matching.path.scheduler", "CondOTScheduler")())

    class Velocity(peer_import("flow_matching.utils", "ModelWrapper")):  # ODESolver passes a scalar t
        def forward(self, x, t, **extras):
            return self.model(x, t.expand(len(x)))

    solver = peer_import("flow_matching.solver", "ODESolver")(velocity_model=Velocity(model))

    def loss(x0, x1, t):
        ps = path.sample(t=t, x_0=x0, x_1=x1)
        return F.mse_loss(model(ps.x_t, ps.t), ps.dx_t)

    def sample(x0, nfe):
        return solver.sample(x_init=x0, step_size=None, method="euler", time_grid=torch.linspace(0, 1, nfe + 1))

    return Peer(loss, sample, ["path/loss: AffineProbPath(CondOTScheduler()).sample(t, x_0, x_1) -> x_t, dx_t, MSE; sampler: "
                               "ODESolver.sample(method='euler', time_grid=linspace(0, 1, K + 1))"])


def rectified_flow_peer(model: nn.Module) -> Peer:
    notes = []
    # it calls model(x, **{time_cond_kwarg: t}) with t of shape (B,); no data normalisation ([0, 1] images to [-1, 1])
    rf = peer_import("rectified_flow_pytorch", "RectifiedFlow", notes)(
        model, time_cond_kwarg="t", data_normalize_fn=None, data_unnormalize_fn=None, odeint_kwargs=dict(method="euler"))
    notes.append("path/loss: RectifiedFlow(model, time_cond_kwarg='t', data_normalize_fn=None, data_unnormalize_fn=None)(x1, "
                 "noise=x0, times=t); sampler: RectifiedFlow.sample(steps=K + 1, noise=x0), odeint_kwargs=dict(method='euler')")

    def sample(x0, nfe):
        return rf.sample(batch_size=len(x0), steps=nfe + 1, noise=x0, data_shape=tuple(x0.shape[1:]))

    return Peer(lambda x0, x1, t: rf(x1, noise=x0, times=t), sample, notes)


class Interval(nn.Module):
    """MeanFlow calls model(z, t, t - r); flowmatch's MeanFlow MLP takes the interval as h."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model

    def forward(self, x, t, delta):
        return self.net(x, t, h=delta)


def rectified_flow_meanflow_peer(model: nn.Module) -> Peer:
    notes = []
    mf = peer_import("rectified_flow_pytorch", "MeanFlow", notes)(Interval(model), data_shape=(2,))  # the library's defaults
    notes.append("MeanFlow(model, data_shape=(2,)) with its defaults (adaptive weight p 0.5, logit-normal(-0.4, 1) times, half the "
                 "batches flow matching, its own time draws) around flowmatch's MeanFlow MLP; sample() at 1 step, slow_sample() beyond")

    def sample(x0, nfe):
        return mf.sample(noise=x0, batch_size=len(x0)) if nfe == 1 else mf.slow_sample(steps=nfe, noise=x0)

    def velocity(x, t):  # its network in this package's time: noise at 0, d/dt = -d/dtau
        return -model(x, 1 - t, h=torch.zeros_like(t))

    return Peer(lambda x0, x1, t: mf(x1, noise=x0), sample, notes, velocity)


def meanflow_network() -> nn.Module:
    """The network of flowmatch's MeanFlow row (with the interval input), for the peer's MeanFlow too."""
    from flowmatch.config import TrainConfig

    return TrainConfig(objective="meanflow").build_model((2,))


PEERS = {"torchcfm": torchcfm_peer, "torchcfm-ot": lambda model: torchcfm_peer(model, ot=True), "flow_matching": flow_matching_peer,
         "rectified-flow": rectified_flow_peer, "rectified-flow-meanflow": rectified_flow_meanflow_peer,
         "rectified-flow-meanflow-recipe": rectified_flow_meanflow_peer}
NETWORKS = {"rectified-flow-meanflow": meanflow_network, "rectified-flow-meanflow-recipe": meanflow_network}  # not MLP(2)


def list_peers() -> None:
    """Print which peers (and torchdyn, torchcfm's sampler) import here."""
    print("torchvision: a placeholder" if torchvision_placeholder() else "torchvision: installed")
    for module in ("torchcfm.conditional_flow_matching", "torchdyn.core", "flow_matching.path", "flow_matching.solver",
                   "rectified_flow_pytorch"):
        try:
            importlib.import_module(module)
            print(f"{module:<40} imports")
        except Exception as e:  # noqa: BLE001
            print(f"{module:<40} does not import: {type(e).__name__}: {e}")
