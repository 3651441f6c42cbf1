"""A teacher source defined outside the library: the frozen teacher runs on one training batch
in ``every``, and the batches between train on their labels only, trading KD signal for teacher
compute in online distillation. Import it through ``plugins=[teacher_source]`` (this folder on
PYTHONPATH) and pick it with its option: ``"kd.mode={name: online_every, every: 4}"`` (with
``kd.teacher=<teacher.ckpt>``, as for ``kd.mode=online``). tests/test_teacher_source_plugin.py
builds it from the config and checks which batches it teaches."""

from __future__ import annotations

import torch
from torch import nn

from mtkd.kd.teacher_source import OnlineTeacher, register_teacher_source


@register_teacher_source("online_every")
class OnlineEvery(OnlineTeacher):
    """``OnlineTeacher`` on batches 0, every, 2 every, ... of the run; none on the others."""

    def __init__(self, ensemble: nn.Module | None = None, /, every: int = 2) -> None:
        super().__init__(ensemble)
        if every < 1:
            raise ValueError(f"kd.mode=online_every: every={every} must be >= 1")
        self.every = every
        self.batches = 0

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        taught = self.batches % self.every == 0
        self.batches += 1
        return super().outputs(batch) if taught else {}
