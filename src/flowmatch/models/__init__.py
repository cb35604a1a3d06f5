"""Networks ``v(x, t[, label]) -> same shape as x``, built from a JSON-able spec."""

from __future__ import annotations

import math

from torch import nn

from ..errors import SettingError
from .cond import Condition
from .mlp import MLP


def _mlp(shape, condition: Condition, width=512, depth=5, time_scale=10000.0, fourier=0, fourier_scale=1.0, **spec):
    # images and other arrays are flattened: fine for small ones (8x8 digits), a UNet is better beyond
    return MLP(math.prod(shape), width=width, depth=depth, time_scale=time_scale, fourier=(fourier, fourier_scale),
               interval=spec.get("interval", False), film=spec.get("film", False), condition=condition)


def _unet(shape, condition: Condition, time_scale=None, interval=False, unet="auto", film=False, **mlp_only):
    from .unet import UNet, unet_settings

    if film:
        raise SettingError("film", "FiLM time conditioning is the MLP's; the UNet's blocks already take the time")
    # width/depth are the MLP's; the UNet's size is its preset's (--unet), per image size
    if len(shape) != 3:
        raise SettingError("model", f"unet takes images (C, H, W), got samples of shape {tuple(shape)}")
    return UNet(tuple(shape), condition=condition, interval=interval,
                time_scale=1000.0 if time_scale is None else time_scale, **unet_settings(unet, min(shape[1:])))


def network(name: str, shape: tuple | None) -> str:
    """Which network ``--model NAME`` builds for samples of ``shape``: auto takes the UNet for
    images (C, H, W) and the MLP otherwise."""
    if name == "auto":
        return "unet" if shape is not None and len(shape) == 3 else "mlp"
    return name


def _auto(shape, condition: Condition, **spec):
    return MODELS[network("auto", shape)](shape, condition, **spec)


MODELS = {"mlp": _mlp, "unet": _unet, "auto": _auto}
PREDICTIONS = ("velocity", "data")


class DataPrediction(nn.Module):
    """``v(x, t)`` from a network ``D(x, t)`` that predicts the data ``x1`` (Li & He 2025, "Back
    to Basics: Let Denoising Generative Models Denoise"): ``v = alpha' D + sigma' (x - alpha D) /
    sigma`` (the path's :meth:`~flowmatch.paths.AffinePath.x1_to_velocity`), with ``sigma``
    clipped below at ``min_sigma`` near t = 1. Near the data, ``D`` is bounded and step-like
    where the velocity it implies is large and confined to thin bands."""

    def __init__(self, net: nn.Module, path, min_sigma: float = 0.05):
        super().__init__()
        self.net, self.path, self.min_sigma = net, path, min_sigma

    def forward(self, x, t, label=None, h=None):
        if h is not None:  # an interval network: D is where the step's average velocity heads
            d = self.net(x, t, label, h=h)
        else:
            d = self.net(x, t, label) if label is not None else self.net(x, t)
        return self.path.x1_to_velocity(d, x, t, self.min_sigma)


def make_model(spec: dict, shape: tuple, num_classes: int = 0, path=None, cond_dim: int = 0):
    """Build a model from ``{"name": ..., **options}`` for samples of ``shape``; with
    ``prediction: "data"`` the network predicts ``x1`` and ``path`` turns it into a velocity.
    ``num_classes`` labels or a ``cond_dim`` condition vector per sample come as its ``label``."""
    spec = dict(spec)
    name = spec.pop("name")
    prediction = spec.pop("prediction", "velocity")
    if name not in MODELS:
        raise SettingError("model", f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if prediction not in PREDICTIONS:
        raise SettingError("prediction", f"expected one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    net = MODELS[name](tuple(shape), Condition(classes=num_classes, dim=cond_dim), **spec)
    if prediction == "data":
        from ..paths import LinearPath

        return DataPrediction(net, path if path is not None else LinearPath())
    return net


def start_from(model: nn.Module, state: dict, where: str = "weights") -> None:
    """Start ``model`` from a flow-matching network's weights ``state`` (the same network, or its
    interval version: MeanFlow, shortcut). The interval's embedding, which the field's network lacks,
    has its last layer set to zero, so that at the start ``model(x, t, h=h)`` is the field ``v(x, t)``
    for every ``h``; a class-conditional UNet's label embedding becomes the interval UNet's own.
    Weights that do not fit raise :class:`~flowmatch.errors.UserError` naming ``where``."""
    import torch

    from ..errors import UserError

    own, state = model.state_dict(), dict(state)
    for key in [k for k in state if k.endswith("net.class_embedding.weight")]:
        moved = key.removesuffix("net.class_embedding.weight") + "label.weight"
        if moved in own and key not in own:
            state[moved] = state.pop(key)
    interval = [k for k in own if "interval" in k.split(".")]
    unfit = sorted({k for k in own if k not in state and k not in interval} | {k for k in state if k not in own}
                   | {k for k in own if k in state and own[k].shape != state[k].shape})
    if unfit:
        raise UserError(f"{where}: the run's network does not fit this one ({', '.join(unfit[:3])}"
                        f"{', ...' if len(unfit) > 3 else ''})")
    model.load_state_dict({k: state[k] for k in own if k not in interval}, strict=False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] == "interval":
                last = module if isinstance(module, nn.Linear) else module.linear_2
                last.weight.zero_()
                last.bias.zero_()


__all__ = ["MLP", "Condition", "DataPrediction", "MODELS", "make_model", "start_from"]
