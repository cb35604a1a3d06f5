"""A perceptual distance the user supplies, for RF++'s LPIPS-Huber loss (``--loss lpips-huber``).

LPIPS needs network weights that no package here ships and none can be downloaded at run time,
so the user points at a file they have:

- **The file** is a TorchScript module (written by ``torch.jit.save``, read by ``torch.jit.load``:
  TorchScript code and tensors, no Python pickle; it is still code, so use files you trust).
- **Its call** ``d(a, b)`` takes two image batches (B, C, H, W) as the network sees them (a
  diffusers teacher's pixels scaled to [-1, 1], which is LPIPS's own input convention) and
  returns one distance per image pair: shape (B,) or anything with B elements, such as LPIPS's
  (B, 1, 1, 1). Resizing (RF++ compares at 224x224) or repeating grey images to 3 channels is the
  module's business: export it wrapped as you want it applied.

The module's weights are frozen; gradients flow through it to the student's prediction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import SettingError, first_sentence
from .files import load_script

OPTION = "perceptual"  # the setting (the command line: its option) these errors name


class Perceptual:
    """The TorchScript distance in ``path``; :meth:`__call__` gives one distance per image pair.
    ``shape`` (one image): checked on two blank pairs at once, so that a file that is not
    TorchScript, or a module that does not fit the images, fails before anything is written."""

    def __init__(self, path, shape: tuple | None = None):
        self.path = Path(path)
        self.net = load_script(self.path, OPTION, "a TorchScript perceptual distance d(a, b) (torch.jit.save)")
        for p in self.net.parameters():
            p.requires_grad_(False)
        if shape is not None:
            if len(shape) != 3:
                raise SettingError(OPTION, f"a perceptual distance compares images; these samples have shape "
                                f"{tuple(shape)}")
            with torch.no_grad():
                self(torch.zeros(2, *shape), torch.zeros(2, *shape))

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``d(a, b)`` per pair, (B,), in float32 (outside any autocast)."""
        if next(iter(self.net.parameters()), a).device != a.device:
            self.net = self.net.to(a.device)
        try:
            with torch.autocast(a.device.type, enabled=False):
                d = self.net(a.float(), b.float())
        except Exception as e:  # noqa: BLE001 - the user's module on our images
            raise SettingError(OPTION, f"{self.path}: the module failed on images of shape {tuple(a.shape[1:])}: "
                            f"{first_sentence(e)}") from None
        if not isinstance(d, torch.Tensor) or d.numel() != len(a):
            got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise SettingError(OPTION, f"{self.path}: expected one distance per image pair ({len(a)} here), got {got}")
        return d.reshape(len(a)).float()


__all__ = ["Perceptual"]
