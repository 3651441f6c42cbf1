"""One or several frozen teacher checkpoints behind one interface: the cache writer's predict
module and the online-KD teacher."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from mtkd.modules.checkpoint import load_net


class TeacherEnsemble(L.LightningModule):
    def __init__(
        self, checkpoints: list[str], expected_tasks: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if not checkpoints:
            raise ValueError("no teacher checkpoint given; pass teacher=<path/to/teacher.ckpt>")
        loaded = [load_net(p, expected_tasks) for p in checkpoints]
        self.nets = nn.ModuleList([net for net, _, _ in loaded])
        self.tasks = loaded[0][1]
        self.teacher_cfg = loaded[0][2]
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TeacherEnsemble:
        # A teacher stays in eval mode (BatchNorm statistics frozen), even inside a training loop.
        return super().train(False)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = [net(image) for net in self.nets]
        return {
            name: task.combine_teachers([task.teacher_output(r[name]) for r in raw])
            for name, task in self.tasks.items()
        }

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {"sample_id": batch["sample_id"], "outputs": self(batch["image"])}
