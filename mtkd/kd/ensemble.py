"""One or several frozen teacher checkpoints behind one interface: the cache writer's predict
module and the online-KD teacher."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from mtkd.models.pretrained import Normalisation
from mtkd.modules.checkpoint import load_net


class Renormalise(nn.Module):
    """Images normalised with the run's mean/std -> the normalisation a teacher was trained with
    (an exact affine map, so a teacher on [-1, 1] inputs can teach a student on ImageNet ones)."""

    def __init__(self, given: Normalisation, wanted: Normalisation) -> None:
        super().__init__()
        m0, s0 = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in given)
        m1, s1 = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in wanted)
        self.identity = bool(torch.equal(m0, m1) and torch.equal(s0, s1))
        # x1 = ((x0 * s0 + m0) - m1) / s1
        self.register_buffer("scale", s0 / s1, persistent=False)
        self.register_buffer("shift", (m0 - m1) / s1, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.identity else image * self.scale + self.shift


class TeacherEnsemble(L.LightningModule):
    def __init__(
        self,
        checkpoints: list[str],
        expected_tasks: dict[str, Any] | None = None,
        input_norm: Normalisation | None = None,
    ) -> None:
        """``input_norm``: the (mean, std) the images arrive with; each teacher gets them in its
        own checkpoint's normalisation."""
        super().__init__()
        if not checkpoints:
            raise ValueError("no teacher checkpoint given; pass teacher=<path/to/teacher.ckpt>")
        loaded = [load_net(p, expected_tasks) for p in checkpoints]
        self.nets = nn.ModuleList([net for net, _, _ in loaded])
        self.tasks = loaded[0][1]
        self.inputs = nn.ModuleList(
            [
                Renormalise(input_norm or own, own)
                for own in ((tuple(c.data.mean), tuple(c.data.std)) for _, _, c in loaded)
            ]
        )
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TeacherEnsemble:
        # A teacher stays in eval mode (BatchNorm statistics frozen), even inside a training loop.
        return super().train(False)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = [net(renorm(image)) for net, renorm in zip(self.nets, self.inputs)]
        return {
            name: task.combine_teachers([task.teacher_output(r[name]) for r in raw])
            for name, task in self.tasks.items()
        }

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {"sample_id": batch["sample_id"], "outputs": self(batch["image"])}
