"""A thin adapter over diffusers' ``UNet2DModel`` presenting ``v(x, t[, label])``.

flowmatch time ``t`` in [0, 1] (0 = noise) is passed to the UNet's sinusoidal timestep
embedding as ``1000 t``; labels go through its class embedding, with one extra *null*
class (index ``num_classes``, also reached by label -1) for classifier-free guidance. An
*interval* UNet (MeanFlow, shortcut models) also takes the step ``h``, embedded like ``t`` by its
own MLP and added, with the label's embedding, to the time embedding.
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
                 attention: bool = False, interval: bool = False):
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
        classes = num_classes + 1 if num_classes and not interval else None
        self.net = UNet2DModel(
            sample_size=(h, w), in_channels=c, out_channels=c, block_out_channels=channels,
            layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=min(8, channels[0]), num_class_embeds=classes,
            class_embed_type="identity" if interval else None,  # interval: this adapter adds label and h
        )
        self.interval = self.label = None
        if interval:
            from diffusers.models.embeddings import TimestepEmbedding

            dim = 4 * channels[0]  # the UNet's time-embedding width
            self.interval = TimestepEmbedding(channels[0], dim)
            self.label = nn.Embedding(num_classes + 1, dim) if num_classes else None
            # MeanFlow's JVP: forward-mode group norm views its tangent, which after attention
            # is not contiguous ("view size is not compatible"): make it so
            for attn in getattr(self.net.mid_block, "attentions", ()):
                attn.register_forward_hook(lambda module, args, out: out.contiguous())

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None,
                h: torch.Tensor | None = None) -> torch.Tensor:
        """The field at ``(x, t)``; with ``h`` (an interval UNet), the average velocity over
        ``[t, t + h]`` (``h = 0``, or None: the instantaneous velocity)."""
        labels = None
        if self.num_classes:
            if label is None:
                label = torch.full((len(x),), self.num_classes, device=x.device, dtype=torch.long)
            labels = torch.where(label < 0, self.num_classes, label)
        if self.interval is not None:
            h = torch.zeros_like(t) if h is None else h
            cond = self.interval(self.net.time_proj(1000 * h).to(x.dtype))
            labels = cond if labels is None else cond + self.label(labels)
        return self.net(x, 1000 * t, class_labels=labels).sample
