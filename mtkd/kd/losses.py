"""The KD loss registry: per task kind, the distillation losses a run may pick.

A KD loss is ``fn(task, pred, teacher, temperature) -> per-sample loss [B]`` against the
teacher's (cached) output, registered under a task kind and a name. Each kind names its default
(``Task.default_kd_loss``); ``kd.tasks.<task>.loss: <name>`` picks another one for one task. A
new variant (decoupled KD, a feature term, ...) is one decorated function in a plugin module:

    @register_kd_loss("classification", "reverse_kl")
    def reverse_kl(task, pred, teacher, temperature): ...

Each loss states its formula in its docstring (z: logits, T: temperature, p = softmax(z / T)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from data_modules.registry import Registry

if TYPE_CHECKING:
    from mtkd.tasks.base import Task

KDLoss = Callable[["Task", torch.Tensor, torch.Tensor, float], torch.Tensor]

#: task kind -> that kind's KD-loss registry
_KD_LOSSES: dict[str, Registry[KDLoss]] = {}


def kd_losses(kind: str) -> Registry[KDLoss]:
    """The KD losses of task kind ``kind`` (empty until one registers for it)."""
    if kind not in _KD_LOSSES:
        how = f"@register_kd_loss({kind!r}, name)"
        _KD_LOSSES[kind] = Registry("kd.tasks.<t>.loss", f"{kind} KD loss", how)
    return _KD_LOSSES[kind]


def register_kd_loss(kind: str, name: str) -> Callable[[KDLoss], KDLoss]:
    """Function decorator: make ``name`` a KD loss of task kind ``kind``."""
    return kd_losses(kind).register(name)


def kd_loss_names(kind: str) -> list[str]:
    """The KD losses registered for a task kind."""
    return kd_losses(kind).names()


def kd_loss_function(task_name: str, kind: str, name: str | None) -> KDLoss:
    """The registered KD loss ``name`` of ``kind``, with an error naming the valid ones."""
    return kd_losses(kind).get(name, key=f"kd.tasks.{task_name}.loss")


@dataclass
class TaskKD:
    """One task's ``kd.tasks.<task>`` entry; null fields take the run-wide ``kd.alpha`` and
    ``kd.temperature`` and the kind's default loss."""

    alpha: float | None = None
    temperature: float | None = None
    loss: str | None = None


def parse_task_kd(task_name: str, raw: dict[str, Any] | None) -> TaskKD:
    """A ``kd.tasks.<task>`` entry, unknown keys refused with the valid ones listed."""
    raw = dict(raw or {})
    valid = sorted(TaskKD.__dataclass_fields__)
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"kd.tasks.{task_name}: unknown keys {unknown}; valid keys: {valid}")
    return TaskKD(**raw)
