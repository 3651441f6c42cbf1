"""TeacherModule: the large multi-task network trained on labels only."""

from __future__ import annotations

import torch

from mtkd.modules.common import MultiTaskModule


class TeacherModule(MultiTaskModule):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self(batch["image"], self.guides(batch))
        losses = self.supervised_losses(outputs, batch)
        total = self.weighting(losses)
        self.guard_finite(total, losses)
        self.log_train_terms(
            {(n, "loss"): v for n, v in losses.items()}, total, len(batch["image"])
        )
        return total
