"""A thin adapter over diffusers' ``UNet2DModel`` presenting ``v(x, t[, label])``.

flowmatch time ``t`` in [0, 1] (0 = noise) is passed to the UNet's sinusoidal timestep
embedding as ``time_scale * t`` (1000, diffusers' range; one-step objectives: 10, smooth in
time); labels go through its class embedding, with one extra *null*
class (index ``num_classes``, also reached by label -1) for classifier-free guidance. An
*interval* UNet (MeanFlow, shortcut models) also takes the step ``h``, embedded like ``t`` by its
own MLP and added, with the label's embedding, to the time embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SettingError
from .cond import CondEmbedding, Condition, as_condition


def default_channels(size: int) -> tuple[int, ...]:
    """Small defaults per image size (CPU-friendly): 8x8 -> (32, 64); 16 -> (32, 64, 64);
    32 -> (32, 64, 64, 128); larger -> (64, 128, 128, 256). A level halves the image, so a size
    that does not divide keeps fewer levels, at least two (28x28 -> (32, 64, 64): 28, 14, 7)."""
    if size <= 8:
        channels = (32, 64)
    elif size <= 16:
        channels = (32, 64, 64)
    elif size <= 32:
        channels = (32, 64, 64, 128)
    else:
        channels = (64, 128, 128, 256)
    return _levels(channels, size)


def _levels(channels, size: int) -> tuple[int, ...]:
    """The first levels of ``channels`` that halve ``size`` evenly, at least two (a size that
    cannot be halved once is refused where the network is built)."""
    levels = len(channels)
    while levels > 2 and size % 2 ** (levels - 1):
        levels -= 1
    return tuple(channels[:levels])


#: ``--unet`` presets: (channels, layers per block, attention at level indices, dropout); ``auto``
#: and ``small`` are the per-size defaults. ``cifar`` is close to the DDPM/ADM CIFAR-10 network (128
#: channels, multipliers 1-2-2-2, two blocks per level, attention at 16x16 for 32x32 images,
#: dropout 0.1); ``tiny`` is the CPU-sized network of benchmarks/ddpm_teacher.py.
UNET_PRESETS = ("auto", "tiny", "small", "cifar")

#: Pixels (samples x height x width) the CPU evaluates at once outside training: a small chunk's
#: activations stay in the caches (500 images from the 28x28 default UNet at 4 steps: 22 s all at
#: once, 13 s 32 at a time; 1000 8x8 digits at 10 steps: 6.0 s at once, 9.6 s 32 at a time, 5.5 s 392)
CPU_CHUNK_PIXELS = 32 * 28 * 28


def cpu_chunk(h: int, w: int) -> int:
    """Samples of ``h x w`` pixels the CPU evaluates at once outside training."""
    return max(1, CPU_CHUNK_PIXELS // (h * w))


def unet_settings(preset: str, size: int) -> dict:
    """The UNet a preset builds for images whose smaller side is ``size``; levels that do not
    halve ``size`` evenly are dropped."""
    if preset not in UNET_PRESETS:
        raise SettingError("unet", f"unknown preset {preset!r}; expected one of {', '.join(UNET_PRESETS)}")
    if preset == "tiny":
        channels = _levels((16, 32, 64), size)
        return {"channels": channels, "layers_per_block": 1, "attention": (len(channels) - 1,), "dropout": 0.0}
    if preset == "cifar":
        channels = _levels((128, 256, 256, 256), size)
        return {"channels": channels, "layers_per_block": 2, "attention": (1,) if len(channels) > 2 else (), "dropout": 0.1}
    return {"channels": default_channels(size), "layers_per_block": 1, "attention": (), "dropout": 0.0}


class UNet(nn.Module):
    def __init__(self, shape, condition: Condition | int | None = None, channels: tuple[int, ...] | None = None,
                 layers_per_block: int = 1, attention: bool | tuple[int, ...] = False, interval: bool = False,
                 dropout: float = 0.0, time_scale: float = 1000.0):
        super().__init__()
        condition = as_condition(condition)
        num_classes, cond_dim = condition.classes, condition.dim
        self.time_scale = time_scale
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise SettingError("model", "unet needs the diffusers package (pip install diffusers)") from None
        if len(shape) != 3:
            raise SettingError("model", f"unet takes images (C, H, W), got samples of shape {tuple(shape)}")
        c, h, w = shape
        channels = tuple(channels or default_channels(min(h, w)))
        if min(h, w) % 2 ** (len(channels) - 1):
            raise SettingError("image_size", f"{h}x{w} must be divisible by {2 ** (len(channels) - 1)} for this UNet")
        down = ["DownBlock2D"] * len(channels)
        up = ["UpBlock2D"] * len(channels)
        if attention is True:  # at the lowest level
            attention = (len(channels) - 1,) if len(channels) > 1 else ()
        for level in attention or ():
            down[level], up[len(channels) - 1 - level] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.num_classes = num_classes
        classes = num_classes + 1 if num_classes and not interval else None
        self.net = UNet2DModel(
            sample_size=(h, w), in_channels=c, out_channels=c, block_out_channels=channels,
            layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=min(8 if channels[0] < 128 else 32, channels[0]), num_class_embeds=classes, dropout=dropout,
            # interval or a condition vector: this adapter makes the embedding added to the time's
            class_embed_type="identity" if interval or cond_dim else None,
        )
        self.interval = self.label = None
        self.cond = CondEmbedding(cond_dim, 4 * channels[0]) if cond_dim else None  # the time embedding's width
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
        ``[t, t + h]`` (``h = 0``, or None: the instantaneous velocity). Without gradients on the
        CPU it evaluates :func:`cpu_chunk` samples at a time (each sample's value is its own), unless traced."""
        chunk = cpu_chunk(*x.shape[-2:])
        # not while traced (ONNX export, torch.compile): a dynamic batch cannot be compared with the chunk
        if not torch.compiler.is_compiling() and len(x) > chunk and x.device.type == "cpu" and not torch.is_grad_enabled():
            def part(a, i):  # per-sample inputs follow their samples; a shared time or none stays whole
                return a[i:i + chunk] if isinstance(a, torch.Tensor) and a.dim() and len(a) == len(x) else a

            return torch.cat([self(x[i:i + chunk], part(t, i), part(label, i), part(h, i)) for i in range(0, len(x), chunk)])
        labels = None
        if self.cond is not None:
            labels, label = self.cond(label, len(x), x.dtype), None
        if self.num_classes:
            if label is None:
                label = torch.full((len(x),), self.num_classes, device=x.device, dtype=torch.long)
            labels = torch.where(label < 0, self.num_classes, label)
        if self.interval is not None:
            h = torch.zeros_like(t) if h is None else h
            cond = self.interval(self.net.time_proj(self.time_scale * h).to(x.dtype))
            labels = cond if labels is None else cond + (self.label(labels) if self.label is not None else labels)
        return self.net(x, self.time_scale * t, class_labels=labels).sample
