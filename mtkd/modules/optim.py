"""Optimisers and learning-rate schedules (``optim.name``, ``optim.scheduler``).

Optimisers are timm's (``create_optimizer_v2``: ``adamw``, ``adam``, ``sgd`` with Nesterov
momentum 0.9, and every other name of ``timm.optim.list_optimizers()``). Schedules are a
registry (``@register_schedule``) of per-step multipliers of each parameter group's own rate:
timm's schedulers start warm-up from one absolute rate for every group, which would change the
encoder group's warm-up under ``optim.encoder_lr_mult``, and Lightning does not step them
without a custom hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from timm.optim import create_optimizer_v2, list_optimizers

from data_modules.registry import Registry

#: (total steps, warm-up steps, **options) -> (step -> multiplier of each parameter group's
#: rate), or None for a constant rate
Schedule = Callable[..., Callable[[int], float] | None]

#: ``optim.scheduler`` -> factory, called with (total, warmup) and the choice's options
SCHEDULES: Registry[Schedule] = Registry(
    "optim.scheduler", "schedule", "@register_schedule(name)", given=2
)


def optimizer_names() -> list[str]:
    """The valid ``optim.name`` values: timm's optimiser registry."""
    return list_optimizers()


def build_optimizer(params: list[dict[str, Any]], optim: Any) -> torch.optim.Optimizer:
    """timm's optimiser ``optim.name`` over parameter groups (each with its own ``lr``)."""
    if optim.name not in optimizer_names():
        raise ValueError(
            f"optim.name={optim.name!r} is unknown; choose one of timm's: {optimizer_names()}"
        )
    return create_optimizer_v2(params, opt=optim.name, lr=optim.lr, weight_decay=optim.weight_decay)


def register_schedule(name: str) -> Callable[[Schedule], Schedule]:
    """Function decorator: ``optim.scheduler=name`` selects this multiplier factory; its keyword
    parameters after ``total`` and ``warmup`` are its options
    (``optim.scheduler={name: ..., option: value}``)."""
    return SCHEDULES.register(name)


@register_schedule("none")
def constant(total: int, warmup: int) -> None:
    """A constant rate: no scheduler (and no warm-up)."""
    return None


@register_schedule("cosine")
def cosine(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then half a cosine from 1 to 0 at ``total``."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def build_schedule(
    choice: str | Mapping[str, Any], optimizer: torch.optim.Optimizer, total: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The per-step schedule ``optim.scheduler`` (a name or ``{name: ..., **options}``); None
    for a constant rate."""
    multiplier = SCHEDULES.create(choice, total, warmup)
    if multiplier is None:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
