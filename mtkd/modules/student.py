"""StudentModule: L = sum_t w_t [(1 - a_t) L_sup_t + a_t L_kd_t].

Supervised terms average over labeled samples; KD terms over every sample with a teacher
output, so unlabeled images contribute KD only; a task no teacher covers trains on labels only.
Teacher outputs come from the injected ``TeacherSource`` (``mtkd.modules.teacher_source``): the
cache, the frozen teacher on the same view, or none (no KD: every task on labels only).
"""

from __future__ import annotations

from typing import Any

import torch

from mtkd.modules.common import MultiTaskModule, fp32
from mtkd.modules.teacher_source import TeacherSource, build_teacher_source


class StudentModule(MultiTaskModule):
    def __init__(self, config: dict[str, Any], teacher_source: TeacherSource | None = None) -> None:
        """``teacher_source``: where teacher outputs come from; None builds ``kd.mode``'s source."""
        super().__init__(config)
        kd = self.cfg.kd
        self.teacher_source = (
            build_teacher_source(kd.mode) if teacher_source is None else teacher_source
        )
        # Each task holds its parsed kd.tasks.<task> entry (build_tasks); null takes the run's.
        self.alpha = {
            n: float(kd.alpha if t.kd.alpha is None else t.kd.alpha) for n, t in self.tasks.items()
        }
        self.temperature = {
            n: float(t.kd.temperature or kd.temperature or t.default_temperature)
            for n, t in self.tasks.items()
        }

    def setup(self, stage: str) -> None:
        self.teacher_source.setup(self.cfg)

    def on_fit_start(self) -> None:
        self.teacher_source.to(self.device)

    def kd_losses(self, outputs: dict, teacher: dict) -> dict[str, torch.Tensor]:
        """KD terms of the tasks a teacher covers (``teacher`` has no entry for the others)."""
        return {
            n: fp32(
                lambda s, t, task=task, n=n: task.kd_loss(s, t, self.temperature[n]),
                outputs[n],
                teacher[n],
            ).mean()
            for n, task in self.tasks.items()
            if n in teacher
        }

    def step_losses(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and every logged term of one training batch."""
        outputs = self(batch["image"])
        sup = self.supervised_losses(outputs, batch)
        terms = {f"{n}/sup": v for n, v in sup.items()}
        kd = self.kd_losses(outputs, self.teacher_source.outputs(batch))
        terms.update({f"{n}/kd": v for n, v in kd.items()})
        # A task no teacher covers trains on labels only (alpha 0; announced at start-up).
        per_task = {
            n: (1 - self.alpha[n]) * sup[n] + self.alpha[n] * kd[n] if n in kd else sup[n]
            for n in self.tasks
        }
        terms.update({f"{n}/loss": v for n, v in per_task.items()})
        return self.weighting(per_task), terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, terms = self.step_losses(batch)
        self.guard_finite(total, terms)
        self.log_train_terms(terms, total, len(batch["image"]))
        return total
