"""Scalar regression (cup-to-disc ratio, a post-operative outcome, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from mtkd.kd.losses import register_kd_loss
from mtkd.kd.storage import CacheStorage
from mtkd.tasks.base import (
    Annotation,
    Task,
    TaskSpec,
    elementwise_loss,
    global_head,
    register_task,
)


class R2OrNaN(R2Score):
    """R², NaN while fewer than two samples were seen: torchmetrics raises "Needs at least two
    samples" instead, which ended a run whose validation split had one labeled image of the
    task, naming neither task nor cause."""

    def compute(self) -> torch.Tensor:
        if self.total < 2:
            return torch.tensor(float("nan"))
        return super().compute()


class Bounded(nn.Module):
    """z -> low + (high - low) * sigmoid(z): a value that cannot leave its range."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = float(low), float(high)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(z)


@dataclass
class RegressionSpec(TaskSpec):
    #: source labels to predict; defaults to the task's own name
    labels: list[str] = field(default_factory=list)
    loss: str = "mse"
    #: [low, high] of every label (null: unbounded): the head's output is then
    #: low + (high - low) * sigmoid(z), which starts mid-range and cannot leave it. Unbounded,
    #: a cup-to-disc head began at MAE 6.5 for labels in [0, 1], its loss swamping the other
    #: tasks' for epochs, and the demo's no-KD students ended at MAE 0.9-1.2 in some seeds.
    bounds: list[float] | None = None
    loss_only: ClassVar[tuple[str, ...]] = (*TaskSpec.loss_only, "loss")


@register_task("regression")
class RegressionTask(Task):
    spec_class = RegressionSpec
    main_metric = "mae"

    def validate(self) -> None:
        if self.spec.loss not in ("mse", "l1"):
            raise ValueError(f"task {self.name!r}: loss must be 'mse' or 'l1'")
        bounds = self.spec.bounds
        if bounds is not None and not (len(bounds) == 2 and bounds[0] < bounds[1]):
            raise ValueError(
                f"task {self.name!r}: bounds={list(bounds)}; give [low, high] with low < high, "
                "or null for an unbounded output"
            )

    def score(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """R² clipped to [0, 1]: unit-free, 0 for predicting the mean (or with < 2 samples)."""
        return values["r2"].float().nan_to_num(0.0).clamp(0, 1)

    @property
    def default_kd_loss(self) -> str:  # type: ignore[override]
        """KD matches the teacher's prediction with the supervised loss (``loss``: mse or l1)."""
        return self.spec.loss

    @property
    def label_names(self) -> list[str]:
        return list(self.spec.labels) or [self.name]

    @property
    def out_channels(self) -> int:
        return len(self.label_names)

    def build_head(self, in_channels: int) -> nn.Module:
        head = global_head(in_channels, self.out_channels)
        if self.spec.bounds is not None:  # appended: the linear layer keeps its parameter names
            head.append(Bounded(*self.spec.bounds))
        return head

    def target(self, ann: Annotation) -> torch.Tensor | None:
        values = [ann.labels.get(n) for n in self.label_names]
        if any(v is None for v in values):
            return None
        return torch.tensor(values, dtype=torch.float32)

    def empty_target(self, size: int) -> torch.Tensor:
        return torch.zeros(self.out_channels)

    def label_problems(self, labels, masks, points) -> list[str] | None:
        values = {n: labels.get(n) for n in self.label_names}
        if any(v is None for v in values.values()):
            return None
        inf = float("inf")
        return [
            f"{n}={v!r} is not a finite number" for n, v in values.items() if not -inf < v < inf
        ]

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return elementwise_loss(pred, target, self.spec.loss)

    def channel_names(self) -> list[str]:
        return self.label_names

    def cache_dtype(self, storage: CacheStorage) -> np.dtype:
        return np.dtype(np.float32)

    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "mae": MeanAbsoluteError(),
                "rmse": MeanSquaredError(squared=False),
                "r2": R2OrNaN(),
            }
        )

    def update_metrics(self, metrics, pred, target, batch) -> None:
        if self.out_channels == 1:
            pred, target = pred.squeeze(1), target.squeeze(1)
        metrics.update(pred.float(), target)


@register_kd_loss("regression", "mse")
def mse_to_teacher(
    task: RegressionTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """mean_k (y_s,k - y_t,k)^2 to the teacher's values; no temperature (nothing to soften)."""
    return elementwise_loss(pred, teacher, "mse")


@register_kd_loss("regression", "l1")
def l1_to_teacher(
    task: RegressionTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """mean_k |y_s,k - y_t,k| to the teacher's values; no temperature (nothing to soften)."""
    return elementwise_loss(pred, teacher, "l1")
