"""Learning-rate schedules of the official recipes, as ``LambdaLR`` factors (checkpointable)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class CosineRestartFactor:
    """Cosine annealing with restarts, each cycle with its own minimum (BasicSR's
    ``CosineAnnealingRestartCyclicLR``): in cycle ``i`` the rate goes from
    ``eta_min_i + weight_i * (base_lr - eta_min_i)`` down to ``eta_min_i``. After the last cycle it
    stays at the last minimum. Called with the step, returns the multiplier of ``base_lr``.
    """

    def __init__(self, base_lr: float, periods: Sequence[int], eta_mins: Sequence[float], restart_weights: Sequence[float]):
        if not len(periods) == len(eta_mins) == len(restart_weights):
            raise ValueError("periods, eta_mins and restart_weights must have the same length")
        if any(p <= 0 for p in periods):
            raise ValueError(f"periods must be positive, got {list(periods)}")
        self.base_lr = float(base_lr)
        self.periods = [int(p) for p in periods]
        self.eta_mins = [float(e) for e in eta_mins]
        self.restart_weights = [float(w) for w in restart_weights]
        self.cycle_ends = [sum(self.periods[: i + 1]) for i in range(len(self.periods))]

    def __call__(self, step: int) -> float:
        cycle = min(bisect.bisect_right(self.cycle_ends, step), len(self.periods) - 1)
        start = self.cycle_ends[cycle] - self.periods[cycle]
        progress = min((step - start) / self.periods[cycle], 1.0)
        eta_min = self.eta_mins[cycle]
        lr = eta_min + self.restart_weights[cycle] * 0.5 * (self.base_lr - eta_min) * (1 + math.cos(math.pi * progress))
        return lr / self.base_lr


def cosine_annealing_restarts(
    optimizer: Optimizer,
    periods: Sequence[int],
    eta_mins: Sequence[float],
    restart_weights: Sequence[float] | None = None,
) -> LambdaLR:
    """Per-step scheduler; e.g. Restormer: periods [92000, 208000], eta_mins [3e-4, 1e-6]."""
    weights = restart_weights if restart_weights is not None else [1.0] * len(periods)
    factors = [CosineRestartFactor(group["lr"], periods, eta_mins, weights) for group in optimizer.param_groups]
    return LambdaLR(optimizer, factors)
