"""Multi-label classification (e.g. ODIR's N D G C A H M O findings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAUROC, MultilabelF1Score

from mtkd.kd.losses import register_kd_loss
from mtkd.tasks.base import Annotation, Frame, Task, TaskSpec, global_head, register_task


@dataclass
class MultilabelSpec(TaskSpec):
    classes: list[str] = field(default_factory=list)


@register_task("multilabel")
class MultilabelTask(Task):
    spec_class = MultilabelSpec
    activation = "sigmoid"
    default_temperature = 2.0
    default_kd_loss = "bce"
    main_metric = "auroc"

    def validate(self) -> None:
        if len(self.spec.classes) < 2:
            raise ValueError(f"task {self.name!r}: multilabel needs at least two classes")

    def score(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Macro AUROC rescaled so that chance (0.5) scores 0."""
        return (2 * values["auroc"].float().nan_to_num(0.5) - 1).clamp(0, 1)

    @property
    def out_channels(self) -> int:
        return len(self.spec.classes)

    def build_head(self, in_channels: int) -> nn.Module:
        return global_head(in_channels, self.out_channels)

    def target(self, ann: Annotation) -> torch.Tensor | None:
        values = [ann.labels.get(c) for c in self.spec.classes]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            missing = [c for c, v in zip(self.spec.classes, values) if v is None]
            raise ValueError(f"task {self.name!r}: sample labels some classes but not {missing}")
        return torch.tensor(values, dtype=torch.float32)

    def empty_target(self, size: int) -> torch.Tensor:
        return torch.zeros(self.out_channels)

    def label_problems(self, labels, masks, points) -> list[str] | None:
        values = {c: labels.get(c) for c in self.spec.classes}
        missing = [c for c, v in values.items() if v is None]
        if len(missing) == len(values):
            return None
        problems = [f"labels some classes but not {missing}"] if missing else []
        bad = {c: v for c, v in values.items() if v is not None and not 0 <= v <= 1}
        return problems + [f"{c}={v!r} is not in [0, 1]" for c, v in bad.items()]

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(dim=1)

    def combine_teachers(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Average the teachers' probabilities; return their logits."""
        mean = torch.stack([torch.sigmoid(o) for o in outputs]).mean(dim=0)
        return torch.logit(mean, eps=1e-6)

    def channel_names(self) -> list[str]:
        return list(self.spec.classes)

    def summarise(self, value: torch.Tensor, frame: Frame) -> dict[str, Any]:
        return {"probabilities": dict(zip(self.channel_names(), value.tolist()))}

    def summary_line(self, summary: dict[str, Any]) -> str:
        return "  ".join(f"{k}={v:.2f}" for k, v in summary["probabilities"].items())

    def metrics(self) -> MetricCollection:
        n = self.out_channels
        return MetricCollection(
            {
                "auroc": MultilabelAUROC(n, average="macro"),
                "f1": MultilabelF1Score(n, average="macro"),
            }
        )

    def update_metrics(self, metrics, pred, target, batch) -> None:
        metrics.update(torch.sigmoid(pred.float()), target.long())


@register_kd_loss("multilabel", "bce")
def soft_bce(
    task: MultilabelTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-class binary KD: T^2 * mean_c BCE(sigmoid(z_s,c / T), q_c), the teacher's softened
    probability q_c = sigmoid(z_t,c / T) as the soft label (BCE(x, q) = -q log x - (1-q) log(1-x);
    it exceeds the binary KL by the teacher's entropy, a constant for the student)."""
    soft = torch.sigmoid(teacher / temperature)
    bce = F.binary_cross_entropy_with_logits(pred / temperature, soft, reduction="none")
    return bce.mean(dim=1) * temperature**2
