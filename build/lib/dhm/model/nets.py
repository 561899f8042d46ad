"""CIFAR-style ResNet-18 trunks: an encoder and a mirrored decoder, width-configurable.

The encoder is the usual CIFAR ResNet-18 (3x3 stem, no max-pool, four stages of two basic
blocks, strides 1/2/2/2, global average pool). ``width`` is the channel count of the first stage
(64 = ResNet-18; stages have width, 2w, 4w, 8w channels). The decoder mirrors it: latent ->
8w x 4 x 4 -> upsampling residual stages -> 3 x 32 x 32.

Stage indices follow ``vae_split_layer``: the input to stage s is the image (s = 0), the stem's
output (s = 1), or the output of encoder stage s - 1 (s = 2, 3, 4). ``encoder_stage_shape(s)``
gives its shape; ``ResNetEncoder(first_stage=s)`` starts at stage s and the decoder built with
``last_stage=s`` ends by reconstructing exactly that tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_LAYERS = (0, 1, 2, 3, 4)


def stage_channels(width: int) -> tuple[int, int, int, int]:
    """Channels of encoder stages 1..4."""
    return (width, 2 * width, 4 * width, 8 * width)


def encoder_stage_shape(stage: int, width: int, image_size: int = 32) -> tuple[int, int, int]:
    """Shape (C, H, W) of the tensor entering encoder stage ``stage`` (0 = the image)."""
    if stage == 0:
        return (3, image_size, image_size)
    ch = stage_channels(width)
    if stage in (1, 2):
        return (ch[0], image_size, image_size)
    # Stage s >= 3 receives stage s-1's output, downsampled by 2 ** (s - 2).
    return (ch[stage - 2], image_size // 2 ** (stage - 2), image_size // 2 ** (stage - 2))


def norm_layer(channels: int, norm: str = "batch") -> nn.Module:
    """BatchNorm (the ResNet default) or GroupNorm, whose output does not depend on the batch."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"norm={norm!r} is not allowed: batch or group")


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = norm_layer(c_out, norm)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = norm_layer(c_out, norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm_layer(c_out, norm)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class UpBlock(nn.Module):
    """Mirror of BasicBlock: a c_in -> c_in conv, then upsampling (x1 or x2) and c_in -> c_out.

    The wide convolution runs first, at the lower resolution, so a decoder stage costs what
    its encoder stage costs (the decoder is a full third ResNet-18 trunk).
    """

    def __init__(self, c_in: int, c_out: int, scale: int = 1, norm: str = "batch"):
        super().__init__()
        self.scale = scale
        self.conv1 = _conv3x3(c_in, c_in)
        self.bn1 = norm_layer(c_in, norm)
        self.conv2 = _conv3x3(c_in, c_out)
        self.bn2 = norm_layer(c_out, norm)
        self.shortcut: nn.Module = nn.Identity()
        if scale != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, bias=False), norm_layer(c_out, norm)
            )

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="nearest") if self.scale != 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self._up(out)))
        return F.relu(out + self.shortcut(self._up(x)))


class ResNetEncoder(nn.Module):
    """CIFAR ResNet-18 trunk from stage ``first_stage`` to the pooled features.

    forward(x [B, *encoder_stage_shape(first_stage)]) -> [B, 8 * width]; ``stage_inputs`` also
    returns the tensor entering every stage, which the DHM's VAE branch taps (the thesis code
    used a forward hook for the same thing).
    """

    def __init__(self, width: int = 64, first_stage: int = 0, norm: str = "batch"):
        super().__init__()
        if first_stage not in SPLIT_LAYERS:
            raise ValueError(f"first_stage must be one of {SPLIT_LAYERS}, got {first_stage}")
        self.width, self.first_stage = width, first_stage
        ch = stage_channels(width)
        self.out_features = ch[3]
        self.stem: nn.Module | None = None
        if first_stage == 0:
            self.stem = nn.Sequential(
                _conv3x3(3, width), norm_layer(width, norm), nn.ReLU(inplace=True)
            )
        stages = []
        c_in = width
        for s in range(1, 5):
            c_out, stride = ch[s - 1], (1 if s == 1 else 2)
            if s >= max(first_stage, 1):
                stages.append(
                    nn.Sequential(
                        BasicBlock(c_in, c_out, stride, norm), BasicBlock(c_out, c_out, norm=norm)
                    )
                )
            c_in = c_out
        self.stages = nn.ModuleList(stages)

    def stage_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pooled features [B, 8w] and the inputs of stages first_stage..4 (index 0 = own input)."""
        inputs = [x]
        if self.stem is not None:
            x = self.stem(x)
            inputs.append(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                inputs.append(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_inputs(x)[0]


class ResNetDecoder(nn.Module):
    """Mirror of ResNetEncoder: latent [B, D] -> the tensor entering encoder stage ``last_stage``.

    latent -> Linear -> 8w x 4 x 4 -> decoder stage 4 (-> 4w x 8 x 8) -> stage 3 (-> 2w x 16 x 16)
    -> stage 2 (-> w x 32 x 32) -> stage 1 (-> w x 32 x 32) -> 3x3 conv (-> 3 x 32 x 32). Stops
    after the stage whose output has the shape of ``encoder_stage_shape(last_stage)``. The output
    is unconstrained: it is the mean of a Gaussian observation model.
    """

    def __init__(self, latent_dim: int, width: int = 64, last_stage: int = 0, norm: str = "batch"):
        super().__init__()
        if last_stage not in SPLIT_LAYERS:
            raise ValueError(f"last_stage must be one of {SPLIT_LAYERS}, got {last_stage}")
        ch = stage_channels(width)
        self.top_channels = ch[3]
        self.fc = nn.Linear(latent_dim, ch[3] * 4 * 4)
        blocks = []
        # Decoder stage s mirrors encoder stage s: its output shape back to its input shape.
        for s in range(4, max(last_stage, 1) - 1, -1):
            c_in, c_out = ch[s - 1], ch[max(s - 2, 0)]
            scale = 2 if s >= 2 else 1
            blocks.append(
                nn.Sequential(UpBlock(c_in, c_in, norm=norm), UpBlock(c_in, c_out, scale, norm))
            )
        self.stages = nn.Sequential(*blocks)
        self.to_image = _conv3x3(width, 3) if last_stage == 0 else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], self.top_channels, 4, 4)
        x = self.stages(x)
        return self.to_image(x) if self.to_image is not None else x
