"""Landmark localisation: K points (optic-disc centre, fovea) in normalised coordinates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection

from mtkd.tasks.base import (
    Annotation,
    CacheStorage,
    Task,
    TaskSpec,
    elementwise_loss,
    global_head,
    register_task,
)


@dataclass
class LocalizationSpec(TaskSpec):
    points: list[str] = field(default_factory=list)
    loss: str = "l1"
    loss_only: ClassVar[tuple[str, ...]] = (*TaskSpec.loss_only, "loss")


class MeanPointDistance(Metric):
    """Mean Euclidean distance between predicted and true points, normalised (fraction of the
    image side) or in original-image pixels (through each sample's ``pixel_scale``)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, in_pixels: bool) -> None:
        super().__init__()
        self.in_pixels = in_pixels
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, pixel_scale: torch.Tensor) -> None:
        diff = pred.double() - target.double()
        if self.in_pixels:
            diff = diff * pixel_scale.double()[:, None, :]
        self.total += diff.norm(dim=-1).sum()
        self.count += diff.shape[0] * diff.shape[1]

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


@register_task("localization")
class LocalizationTask(Task):
    spec_class = LocalizationSpec
    teacher_spatial = "points"
    monitor = ("dist", "min")

    def validate(self) -> None:
        if not self.spec.points:
            raise ValueError(f"task {self.name!r}: localization needs a list of points")
        if self.spec.loss not in ("mse", "l1"):
            raise ValueError(f"task {self.name!r}: loss must be 'mse' or 'l1'")

    @property
    def num_points(self) -> int:
        return len(self.spec.points)

    @property
    def out_channels(self) -> int:
        return 2 * self.num_points

    def build_head(self, in_channels: int) -> nn.Module:
        return nn.Sequential(
            global_head(in_channels, self.out_channels),
            nn.Sigmoid(),
            nn.Unflatten(1, (self.num_points, 2)),
        )

    def required_points(self) -> list[str]:
        return list(self.spec.points)

    def target(self, ann: Annotation) -> torch.Tensor | None:
        if not all(p in ann.points for p in self.spec.points):
            return None
        return torch.tensor([ann.points[p] for p in self.spec.points], dtype=torch.float32)

    def empty_target(self, size: int) -> torch.Tensor:
        return torch.zeros(self.num_points, 2)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return elementwise_loss(pred, target, self.spec.loss)

    def kd_loss(
        self, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        return elementwise_loss(pred, teacher, "mse")

    def cache_shape(self, storage: CacheStorage) -> tuple[int, ...]:
        return (self.num_points, 2)

    def cache_dtype(self, storage: CacheStorage) -> np.dtype:
        return np.dtype(np.float32)

    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "dist": MeanPointDistance(in_pixels=False),
                "dist_px": MeanPointDistance(in_pixels=True),
            }
        )

    def update_metrics(self, metrics, pred, target, batch) -> None:
        metrics.update(pred.float(), target, pixel_scale=batch["pixel_scale"])
