"""StudentModule: L = sum_t w_t [(1 - a_t) L_sup_t + a_t L_kd_t].

Supervised terms average over labeled samples; KD terms over every sample with a teacher
output, so unlabeled images contribute KD only; a task no teacher covers trains on labels only. Teacher outputs come from the cache
(``batch["teacher"]``) or, with ``kd.mode=online``, from the frozen teacher on the same view.
"""

from __future__ import annotations

from typing import Any

import torch

from mtkd.kd.ensemble import TeacherEnsemble, announce, configured_teachers
from mtkd.modules.common import MultiTaskModule, fp32


class StudentModule(MultiTaskModule):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        kd = self.cfg.kd
        self.kd_mode = kd.mode
        per_task = {n: dict(kd.tasks.get(n, {})) for n in self.tasks}
        self.alpha = {
            n: 0.0 if kd.mode == "none" else float(per_task[n].get("alpha", kd.alpha))
            for n in self.tasks
        }
        self.temperature = {
            n: float(per_task[n].get("temperature") or kd.temperature or t.default_temperature)
            for n, t in self.tasks.items()
        }
        # Held in a list so Lightning neither trains, checkpoints nor counts the teacher.
        self._teacher: list[TeacherEnsemble] = []

    def setup(self, stage: str) -> None:
        if self.kd_mode == "online" and not self._teacher:
            kd = self.cfg.kd
            teachers = configured_teachers(kd.teachers, [kd.teacher] if kd.teacher else [])
            if not teachers:
                raise ValueError(
                    "kd.mode=online needs kd.teacher=<path/to/teacher.ckpt> or a kd.teachers list"
                )
            ensemble = TeacherEnsemble(teachers, dict(self.hparams.config["tasks"]), self.cfg.data)
            announce(ensemble.provenance(list(self.tasks)), ensemble.notes)
            self._teacher.append(ensemble)

    def on_fit_start(self) -> None:
        if self._teacher:
            self._teacher[0].to(self.device)

    def teacher_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.kd_mode == "online":
            return self._teacher[0](batch["image"])
        if "teacher" not in batch:
            raise ValueError(
                "kd.mode=cached but the batch has no teacher outputs; set kd.cache_dir"
            )
        return batch["teacher"]

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
        if self.kd_mode == "none":
            per_task = sup
        else:
            kd = self.kd_losses(outputs, self.teacher_outputs(batch))
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
