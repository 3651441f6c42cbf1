"""Task weighting: fixed weights, homoscedastic uncertainty (Kendall et al. 2018) or dynamic
weight averaging (Liu et al. 2019)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TaskWeighting(nn.Module):
    def __init__(self, mode: str, weights: dict[str, float], dwa_temperature: float = 2.0) -> None:
        super().__init__()
        self.mode = mode
        self.names = list(weights)
        self.register_buffer(
            "fixed", torch.tensor([weights[n] for n in self.names], dtype=torch.float32)
        )
        self.log_vars = (
            nn.Parameter(torch.zeros(len(self.names))) if mode == "uncertainty" else None
        )
        self.dwa_temperature = dwa_temperature
        self.register_buffer("dwa_weights", torch.ones(len(self.names)))
        self.history: list[list[float]] = []

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.fixed.device)
        for i, name in enumerate(self.names):
            loss = losses[name]
            if self.mode == "uncertainty":
                loss = torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
            elif self.mode == "dwa":
                loss = self.dwa_weights[i] * loss
            total = total + self.fixed[i] * loss
        return total

    def current(self) -> dict[str, float]:
        """Effective multiplier of each task's loss (for logging)."""
        if self.mode == "uncertainty":
            scale = torch.exp(-self.log_vars.detach())
        elif self.mode == "dwa":
            scale = self.dwa_weights
        else:
            scale = torch.ones_like(self.fixed)
        return {n: float(self.fixed[i] * scale[i]) for i, n in enumerate(self.names)}

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        """DWA: weight each task by how slowly its loss fell over the last two epochs."""
        if self.mode != "dwa":
            return
        self.history.append([epoch_losses.get(n, 0.0) for n in self.names])
        if len(self.history) < 2:
            return
        prev, last = self.history[-2], self.history[-1]
        ratios = [lst / p if p > 0 else 1.0 for lst, p in zip(last, prev)]
        exps = [math.exp(r / self.dwa_temperature) for r in ratios]
        k = len(self.names)
        self.dwa_weights.copy_(torch.tensor([k * e / sum(exps) for e in exps]))
