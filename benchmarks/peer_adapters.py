"""The peer libraries behind benchmarks/peers.py: one function per library that wraps the shared
network in the library's own path/loss objects and sampler (a ``Peer``), and what they need."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peer_common import SEED


def noise(n: int) -> torch.Tensor:
    """The sampling noise of every row: what ``Run.sample(n, seed=0)`` draws."""
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(SEED))


@contextlib.contextmanager
def counting_calls(model: nn.Module):
    """Count the network's forward calls (a sampler's NFE) while the block runs."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


# ---------------------------------------------------------------- one function per library


class PeerUnavailable(Exception):
    """The peer (or a part of it this benchmark needs) does not import here."""


@dataclass
class Peer:
    """A library's training step and sampler around the shared network.

    ``loss(x0, x1, t)``: the library's path/loss objects on a batch (noise x0, data x1, times t);
    ``sample(x0, nfe)``: the library's own sampler, ``nfe`` Euler steps from noise ``x0``.
    """

    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    sample: Callable[[torch.Tensor, int], torch.Tensor]
    notes: list[str] = field(default_factory=list)
    #: the instantaneous velocity in this package's time (noise at 0), for dopri5's NFE; None: model(x, t)
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def euler(model: nn.Module, x0: torch.Tensor, nfe: int) -> torch.Tensor:
    """The notebook's sampler: Euler on the grid ``t_k = k / K``."""
    x = x0.clone()
    for k in range(nfe):
        x = x + model(x, torch.full((len(x),), k / nfe)) / nfe
    return x


class TimeFirst(nn.Module):
    """torchdyn calls its vector field as ``f(t, x)`` with a scalar ``t``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, t, x, *args, **kwargs):
        return self.model(x, t.expand(len(x)))


def torchdyn_sampler(model: nn.Module, notes: list[str]):
    """torchcfm's examples sample with torchdyn's NeuralODE; plain Euler when torchdyn does not import."""
    try:
        from torchdyn.core import NeuralODE
    except Exception as e:  # noqa: BLE001 - any import failure means: fall back
        notes.append(f"sampler: plain Euler loop on t_k = k/K (torchdyn does not import: {type(e).__name__}: {e})")
        return lambda x0, nfe: euler(model, x0, nfe)
    node = NeuralODE(TimeFirst(model), solver="euler")
    notes.append("sampler: torchdyn NeuralODE(solver='euler').trajectory on t_span = linspace(0, 1, K + 1)")
    return lambda x0, nfe: node.trajectory(x0, t_span=torch.linspace(0, 1, nfe + 1))[-1]


def torchcfm_peer(model: nn.Module, ot: bool = False) -> Peer:
    try:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher
    except Exception as e:  # noqa: BLE001
        raise PeerUnavailable(f"torchcfm does not import: {type(e).__name__}: {e}") from None
    fm = (ExactOptimalTransportConditionalFlowMatcher if ot else ConditionalFlowMatcher)(sigma=0.0)
    notes = [f"path/loss: {type(fm).__name__}(sigma=0.0).sample_location_and_conditional_flow(x0, x1, t), MSE"]
    if ot:
        notes.append("exact OT plan per batch (POT emd), pairs drawn from it with numpy's global RNG (seeded 0)")

    def loss(x0, x1, t):
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t)
        return F.mse_loss(model(xt, t), ut)

    return Peer(loss, torchdyn_sampler(model, notes), notes)


def flow_matching_peer(model: nn.Module) -> Peer:
    try:
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper
    except Exception as e:  # noqa: BLE001
        raise PeerUnavailable(f"flow_matching does not import: {type(e).__name__}: {e}") from None

    class Velocity(ModelWrapper):  # ODESolver passes a scalar t; the network takes t of shape (B,)
        def forward(self, x, t, **extras):
            return self.model(x, t.expand(len(x)))

    path = AffineProbPath(scheduler=CondOTScheduler())
    solver = ODESolver(velocity_model=Velocity(model))

    def loss(x0, x1, t):
        ps = path.sample(t=t, x_0=x0, x_1=x1)
        return F.mse_loss(model(ps.x_t, ps.t), ps.dx_t)

    def sample(x0, nfe):
        return solver.sample(x_init=x0, step_size=None, method="euler", time_grid=torch.linspace(0, 1, nfe + 1))

    return Peer(loss, sample, ["path/loss: AffineProbPath(scheduler=CondOTScheduler()).sample(t, x_0, x_1) -> x_t, dx_t; MSE",
                               "sampler: ODESolver.sample(method='euler', step_size=None, time_grid=linspace(0, 1, K + 1))"])


def _torchvision_placeholder() -> bool:
    """rectified_flow_pytorch imports torchvision at the top of rectified_flow.py for image helpers
    only (save_image, a VGG perceptual loss, image transforms), none of which this benchmark calls.
    torchvision does not import beside this torch, so when it is absent, inert modules stand in
    for it (in this worker process only); calling anything from them raises."""
    if importlib.util.find_spec("torchvision") is not None:
        return False

    def absent(*_, **__):
        raise ImportError("torchvision is not installed (placeholder from benchmarks/peer_adapters.py)")

    contents = {"torchvision": {}, "torchvision.utils": {"save_image": absent}, "torchvision.transforms": {},
                "torchvision.models": {"vgg16": absent, "VGG16_Weights": types.SimpleNamespace(DEFAULT=None)}}
    for name, attrs in contents.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        if "." in name:
            setattr(sys.modules["torchvision"], name.split(".")[1], module)
    return True


def _rectified_flow_pytorch(name: str, notes: list[str]):
    """``rectified_flow_pytorch.<name>``, with torchvision's placeholder when it is absent (noted)."""
    if _torchvision_placeholder():
        notes.append("torchvision absent: inert placeholder modules stand in for it (used only by image helpers)")
    try:
        return getattr(importlib.import_module("rectified_flow_pytorch"), name)
    except Exception as e:  # noqa: BLE001
        raise PeerUnavailable(f"rectified_flow_pytorch does not import: {type(e).__name__}: {e}") from None


def rectified_flow_peer(model: nn.Module) -> Peer:
    notes = []
    RectifiedFlow = _rectified_flow_pytorch("RectifiedFlow", notes)  # noqa: N806
    # The wrapper calls model(x, **{time_cond_kwarg: t}) with t of shape (B,): naming the MLP's `t`
    # fits it as is. No data normalisation (its default maps [0, 1] images to [-1, 1]).
    rf = RectifiedFlow(model, time_cond_kwarg="t", data_normalize_fn=None, data_unnormalize_fn=None,
                       odeint_kwargs=dict(method="euler"))
    notes += ["path/loss: RectifiedFlow(model, time_cond_kwarg='t', data_normalize_fn=None, data_unnormalize_fn=None)"
              "(x1, noise=x0, times=t), its MSE on x1 - x0",
              "sampler: RectifiedFlow.sample(steps=K + 1, noise=x0) with odeint_kwargs=dict(method='euler')"]

    def sample(x0, nfe):
        return rf.sample(batch_size=len(x0), steps=nfe + 1, noise=x0, data_shape=tuple(x0.shape[1:]))

    return Peer(lambda x0, x1, t: rf(x1, noise=x0, times=t), sample, notes)


def meanflow_network() -> nn.Module:
    """The network of flowmatch's MeanFlow row (``TrainConfig(objective="meanflow")``'s MLP, with
    the interval input), built the same way for the peer's MeanFlow."""
    from flowmatch.config import TrainConfig

    return TrainConfig(objective="meanflow").build_model((2,))


def rectified_flow_meanflow_peer(model: nn.Module) -> Peer:
    notes = []
    MeanFlow = _rectified_flow_pytorch("MeanFlow", notes)  # noqa: N806

    class Interval(nn.Module):  # MeanFlow calls model(z, t, t - r); the MLP takes the interval as h
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, t, delta):
            return self.net(x, t, h=delta)

    mf = MeanFlow(Interval(), data_shape=(2,))  # the library's defaults: adaptive weight p 0.5, logit-normal(-0.4, 1), ...
    notes += ["path/loss: MeanFlow(model, data_shape=(2,)) with its defaults (adaptive loss weight p = 0.5, "
              "logit-normal(-0.4, 1) times, half the batches plain flow matching), MeanFlow(x1, noise=x0); "
              "its own time convention (data at 0, noise at 1) and its own time draws (torch's global RNG, "
              "Python's random for the batch's objective, both seeded 0)",
              "network: flowmatch's MeanFlow MLP (TrainConfig(objective='meanflow').build_model), the interval "
              "t - r passed as h",
              "sampler: MeanFlow.sample(noise=x0) at one step (noise - u(noise, 1, 1)); MeanFlow.slow_sample"
              "(steps=K, noise=x0) beyond, which steps with the instantaneous velocity (interval 0)"]

    def sample(x0, nfe):
        if nfe == 1:
            return mf.sample(noise=x0, batch_size=len(x0))
        return mf.slow_sample(steps=nfe, noise=x0)

    def velocity(x, t):  # its network in this package's time: noise at 0, d/dt = -d/dtau
        return -model(x, 1 - t, h=torch.zeros_like(t))

    return Peer(lambda x0, x1, t: mf(x1, noise=x0), sample, notes, velocity)


# rows whose network is not the notebook's MLP(2)
NETWORKS = {"rectified-flow-meanflow": meanflow_network, "rectified-flow-meanflow-recipe": meanflow_network}


def notebook_peer(model: nn.Module) -> Peer:
    def loss(x0, x1, t):
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        return F.mse_loss(model(xt, t), x1 - x0)

    return Peer(loss, lambda x0, nfe: euler(model, x0, nfe),
                ["path/loss: written out in plain torch; sampler: plain Euler loop on t_k = k/K"])


PEERS = {
    "torchcfm": torchcfm_peer,
    "torchcfm-ot": lambda model: torchcfm_peer(model, ot=True),
    "flow_matching": flow_matching_peer,
    "rectified-flow": rectified_flow_peer,
    "rectified-flow-meanflow": rectified_flow_meanflow_peer,
    "rectified-flow-meanflow-recipe": rectified_flow_meanflow_peer,
    "notebook": notebook_peer,
}


def list_peers() -> None:
    """Print which peers (and samplers) import here."""
    checks = [("torchcfm", "torchcfm.conditional_flow_matching"), ("torchdyn (torchcfm's sampler)", "torchdyn.core"),
              ("flow_matching", "flow_matching.path"), ("flow_matching solver", "flow_matching.solver"),
              ("rectified-flow-pytorch", "rectified_flow_pytorch")]
    for label, module in checks:
        if module == "rectified_flow_pytorch" and _torchvision_placeholder():
            label += " (torchvision placeholder)"
        try:
            importlib.import_module(module)
            print(f"{label:<50} imports")
        except Exception as e:  # noqa: BLE001
            print(f"{label:<50} does not import: {type(e).__name__}: {e}")
