"""Task weighting strategies (``run.weighting``): how per-task losses combine into the training
loss. Built in: fixed weights, homoscedastic uncertainty (Kendall et al. 2018), dynamic weight
averaging (Liu et al. 2019). A new strategy is one ``Weighting`` subclass decorated with
``@register_weighting("name")`` in a plugin module (``plugins=[...]`` or ``MTKD_PLUGINS``);
``run.weighting={name: dwa, temperature: 4}`` passes options to its ``__init__``.

Every strategy multiplies task t's term by its configured weight ``w_t`` (``tasks.<t>.weight``).
The evaluation loss ``val/loss`` is ``sum_t w_t L_t`` under every strategy, and the default
checkpoint monitor ``val/score`` (the tasks' main metrics) does not depend on the strategy
either, so checkpoints of runs with different strategies are selected on one scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from data_modules.registry import Registry


class Weighting(nn.Module):
    """``forward(losses) = sum_t w_t term_t(L_t)``; subclasses define ``term`` (and may learn
    parameters, or adapt at each epoch end from the epoch-mean training losses)."""

    #: the ``run.weighting`` value that selects this strategy
    name: ClassVar[str]
    #: whether ``end_epoch`` needs each task's epoch-mean training loss (a host sync per term)
    needs_epoch_means: ClassVar[bool] = False

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.names = list(weights)
        self.register_buffer(
            "fixed", torch.tensor([weights[n] for n in self.names], dtype=torch.float32)
        )

    def term(self, index: int, loss: torch.Tensor) -> torch.Tensor:
        """Task ``index``'s loss before its configured weight."""
        return loss

    def scales(self) -> torch.Tensor:
        """Each task's multiplier on top of its configured weight (for logging)."""
        return torch.ones_like(self.fixed)

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        """Adapt after a training epoch (``epoch_losses``: task -> mean loss, when
        ``needs_epoch_means``)."""

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.fixed.device)
        for i, name in enumerate(self.names):
            total = total + self.fixed[i] * self.term(i, losses[name])
        return total

    def fixed_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_t w_t L_t`` with the configured weights only: the evaluation loss."""
        total = torch.zeros((), device=self.fixed.device)
        for i, name in enumerate(self.names):
            total = total + self.fixed[i] * losses[name]
        return total

    def current(self) -> dict[str, float]:
        """Effective multiplier of each task's loss (logged as ``train/<task>/weight``)."""
        scale = self.scales()
        return {n: float(self.fixed[i] * scale[i]) for i, n in enumerate(self.names)}


#: ``run.weighting`` -> strategy, built with the configured task weights and the choice's options
WEIGHTINGS: Registry[type[Weighting]] = Registry(
    "run.weighting", "weighting strategy", "@register_weighting(name)", given=1
)


def register_weighting(name: str) -> Callable[[type[Weighting]], type[Weighting]]:
    """Class decorator: ``run.weighting=name`` selects this strategy; the keyword parameters of
    its ``__init__`` after ``weights`` are its options (``run.weighting={name: ..., option: v}``)."""

    def decorate(cls: type[Weighting]) -> type[Weighting]:
        WEIGHTINGS.register(name, cls)
        cls.name = name
        return cls

    return decorate


def build_weighting(choice: str | Mapping[str, Any], weights: dict[str, float]) -> Weighting:
    """The strategy ``run.weighting`` (a name or ``{name: ..., **options}``) over tasks with
    configured ``weights``."""
    return WEIGHTINGS.create(choice, weights)


@register_weighting("fixed")
class FixedWeighting(Weighting):
    """``L = sum_t w_t L_t``."""


@register_weighting("uncertainty")
class UncertaintyWeighting(Weighting):
    """``L = sum_t w_t (exp(-s_t) L_t + s_t)`` with a learned log-variance ``s_t`` per task."""

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__(weights)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def term(self, index: int, loss: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.log_vars[index]) * loss + self.log_vars[index]

    def scales(self) -> torch.Tensor:
        return torch.exp(-self.log_vars.detach())


@register_weighting("dwa")
class DynamicWeightAveraging(Weighting):
    """``L = sum_t w_t d_t L_t`` with ``d = K softmax(r / T)``, ``r_t`` the ratio of task t's
    last two epoch-mean losses (slowly falling losses weigh more), T = ``temperature`` (2 in
    Liu et al.; larger evens the weights out), K tasks."""

    needs_epoch_means = True

    def __init__(self, weights: dict[str, float], temperature: float = 2.0) -> None:
        super().__init__(weights)
        self.temperature = float(temperature)
        self.register_buffer("dwa_weights", torch.ones(len(self.names)))
        self.history: list[list[float]] = []

    def term(self, index: int, loss: torch.Tensor) -> torch.Tensor:
        return self.dwa_weights[index] * loss

    def scales(self) -> torch.Tensor:
        return self.dwa_weights

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        self.history.append([epoch_losses.get(n, 0.0) for n in self.names])
        if len(self.history) < 2:
            return
        prev, last = self.history[-2], self.history[-1]
        ratios = [lst / p if p > 0 else 1.0 for lst, p in zip(last, prev)]
        exps = [math.exp(r / self.temperature) for r in ratios]
        k = len(self.names)
        self.dwa_weights.copy_(torch.tensor([k * e / sum(exps) for e in exps]))
