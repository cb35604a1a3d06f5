"""Networks ``v(x, t[, label]) -> same shape as x``, built from a JSON-able spec."""

from __future__ import annotations

import math

from ..errors import UserError
from .mlp import MLP


def _mlp(shape, num_classes=0, width=512, depth=5, time_scale=10000.0, fourier=0, fourier_scale=1.0):
    # images and other arrays are flattened: fine for small ones (8x8 digits), a UNet is better beyond
    return MLP(math.prod(shape), width=width, depth=depth, time_scale=time_scale, num_classes=num_classes,
               fourier=fourier, fourier_scale=fourier_scale)


def _unet(shape, num_classes=0, width=None, depth=None, time_scale=None, fourier=None, fourier_scale=None):
    from .unet import UNet

    # width/depth are the MLP's; the UNet takes its small defaults per image size
    return UNet(tuple(shape), num_classes=num_classes)


def _auto(shape, num_classes=0, **kw):
    return (_unet if len(shape) == 3 else _mlp)(shape, num_classes=num_classes, **kw)


MODELS = {"mlp": _mlp, "unet": _unet, "auto": _auto}


def make_model(spec: dict, shape: tuple, num_classes: int = 0):
    """Build a model from ``{"name": ..., **options}`` for samples of ``shape``."""
    spec = dict(spec)
    name = spec.pop("name")
    if name not in MODELS:
        raise UserError(f"--model: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](tuple(shape), num_classes=num_classes, **spec)


__all__ = ["MLP", "MODELS", "make_model"]
