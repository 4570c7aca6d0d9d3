"""TilNet: a segmentation backbone plus input normalisation, taking uint8 images."""

from __future__ import annotations

import torch
from torch import nn


class TilNet(nn.Module):
    """Wraps an smp encoder–decoder. Input: uint8 or float (B, 3, H, W) RGB in [0, 255]
    (channels_last welcome); output: float logits (B, C, H, W) where C is
    regions + cell heatmaps (+ lymphocyte-nucleus mask), in the card's order.

    Normalising inside the model keeps the device doing the conversion (the loader ships
    uint8, 4x fewer bytes over PCIe) and makes the card's mean/std impossible to forget.
    """

    def __init__(self, backbone: nn.Module, mean=(0.5,) * 3, std=(0.25,) * 3):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return self.backbone(x)
