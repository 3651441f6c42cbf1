"""A task kind defined outside the library: one sigmoid output for a yes/no label (e.g.
glaucoma suspect). Import it through ``plugins=[binary_task]`` (this folder on PYTHONPATH);
nothing in mtkd is edited. tests/test_extending.py trains, distils, exports and predicts it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAUROC

from mtkd.tasks import Task, TaskSpec, register_kd_loss, register_task
from mtkd.tasks.base import global_head


@dataclass
class BinarySpec(TaskSpec):  # kind and weight come from TaskSpec
    label: str = ""


@register_task("binary")
class BinaryTask(Task):
    spec_class = BinarySpec
    activation = "sigmoid"  # export metadata, predict and panels read probabilities
    default_temperature = 2.0
    default_kd_loss = "bce"
    main_metric = "auroc"

    @property
    def out_channels(self) -> int:
        return 1

    def build_head(self, in_channels: int) -> torch.nn.Module:
        return global_head(in_channels, 1)  # input (batch, in_channels); dense=True: decoder map

    def target(self, ann) -> torch.Tensor | None:  # None: no label for this sample
        value = ann.labels.get(self.spec.label)
        return None if value is None else torch.tensor([float(value)])

    def empty_target(self, size: int) -> torch.Tensor:
        return torch.zeros(1)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # per sample
        return F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(1)

    def channel_names(self) -> list[str]:  # predict's summary and export's metadata
        return [self.spec.label]

    def metrics(self) -> MetricCollection:
        return MetricCollection({"auroc": BinaryAUROC()})

    def update_metrics(self, metrics, pred, target, batch) -> None:
        metrics.update(torch.sigmoid(pred[:, 0]), target[:, 0].long())


@register_kd_loss("binary", "bce")
def soft_bce(task: BinaryTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """T^2 * BCE(sigmoid(z_s / T), sigmoid(z_t / T)): the teacher's softened probability as the
    soft label; T^2 keeps the gradient's scale independent of T, as in every built-in kind."""
    soft = torch.sigmoid(teacher / temperature)
    bce = F.binary_cross_entropy_with_logits(pred / temperature, soft, reduction="none")
    return bce.mean(1) * temperature**2
