"""Pixel losses for restoration (the perceptual loss arrives with Swintormer)."""

from __future__ import annotations

import torch
from torch import nn


class CharbonnierLoss(nn.Module):
    """mean(sqrt((x - y)^2 + eps^2)): a differentiable L1 that is quadratic near zero."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((prediction - target) ** 2 + self.eps**2).mean()
