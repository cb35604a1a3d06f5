"""A thin adapter over diffusers' ``UNet2DModel`` presenting ``v(x, t[, label])``.

flowmatch time ``t`` in [0, 1] (0 = noise) is passed to the UNet's sinusoidal timestep
embedding as ``1000 t``; labels go through its class embedding, with one extra *null*
class (index ``num_classes``, also reached by label -1) for classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def default_channels(size: int) -> tuple[int, ...]:
    """Small defaults per image size (CPU-friendly): 8x8 -> (32, 64); 16 -> (32, 64, 64);
    32 -> (32, 64, 64, 128); larger -> (64, 128, 128, 256)."""
    if size <= 8:
        return (32, 64)
    if size <= 16:
        return (32, 64, 64)
    if size <= 32:
        return (32, 64, 64, 128)
    return (64, 128, 128, 256)


class UNet(nn.Module):
    def __init__(self, shape, num_classes: int = 0, channels: tuple[int, ...] | None = None, layers_per_block: int = 1,
                 attention: bool = False):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise UserError("--model: unet needs the diffusers package (pip install 'flowmatch[images]')") from None
        if len(shape) != 3:
            raise UserError(f"--model: unet takes images (C, H, W), got samples of shape {tuple(shape)}")
        c, h, w = shape
        channels = tuple(channels or default_channels(min(h, w)))
        if min(h, w) % 2 ** (len(channels) - 1):
            raise UserError(f"--image-size: {h}x{w} must be divisible by {2 ** (len(channels) - 1)} for this UNet")
        down = ["DownBlock2D"] * len(channels)
        up = ["UpBlock2D"] * len(channels)
        if attention and len(channels) > 1:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.num_classes = num_classes
        self.net = UNet2DModel(
            sample_size=(h, w), in_channels=c, out_channels=c, block_out_channels=channels,
            layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=min(8, channels[0]), num_class_embeds=num_classes + 1 if num_classes else None,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        labels = None
        if self.num_classes:
            if label is None:
                label = torch.full((len(x),), self.num_classes, device=x.device, dtype=torch.long)
            labels = torch.where(label < 0, self.num_classes, label)
        return self.net(x, 1000 * t, class_labels=labels).sample
