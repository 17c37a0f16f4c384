"""A stand-in for clean-fid's torchscript Inception file (no download)."""

from __future__ import annotations

import torch


class FakeTorchscriptInception(torch.nn.Module):
    """The shape of clean-fid's torchscript file: a `layers` submodule that maps (N, 3, 299, 299) to 2048-d."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(192, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)
