"""Landmark localisation: K points (optic-disc centre, fovea) in normalised coordinates.

Two heads: ``pooled`` regresses the points from the pooled image features; ``heatmap`` predicts
one heatmap per point from the decoder's full-resolution features and reads the point as the
heatmap's soft-argmax. Regression from pooled features drifts to the mean position on real eyes
(the disc sits left or right); a heatmap finds the structure where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection

from mtkd.kd.losses import register_kd_loss
from mtkd.kd.storage import CacheStorage
from mtkd.tasks.base import (
    Annotation,
    Frame,
    Overlay,
    Task,
    TaskSpec,
    draw_counts,
    elementwise_loss,
    global_head,
    register_task,
)

HEADS = ("pooled", "heatmap")


@dataclass
class LocalizationSpec(TaskSpec):
    points: list[str] = field(default_factory=list)
    loss: str = "l1"
    #: "pooled" (regression from pooled features) or "heatmap" (soft-argmax of K heatmaps)
    head: str = "pooled"
    #: heatmap head: std of the Gaussian target around each point, as a fraction of the side
    sigma: float = 0.02
    #: heatmap head: weight of the heatmap term (KL to the Gaussian) beside the coordinate loss
    heatmap_weight: float = 0.1
    loss_only: ClassVar[tuple[str, ...]] = (
        *TaskSpec.loss_only,
        "loss",
        "sigma",
        "heatmap_weight",
    )


def centres(n: int, device: torch.device) -> torch.Tensor:
    """Normalised centres of ``n`` pixels along one axis."""
    return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n


def grid(size_h: int, size_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixel-centre coordinates (x along width, y along height), flattened."""
    y, x = torch.meshgrid(centres(size_h, device), centres(size_w, device), indexing="ij")
    return x.flatten(), y.flatten()


def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] heatmap logits -> [B, K, 2] expected (x, y) under each softmax heatmap."""
    b, k, h, w = logits.shape
    prob = logits.float().flatten(2).softmax(dim=-1)
    x, y = grid(h, w, logits.device)
    return torch.stack([(prob * x).sum(-1), (prob * y).sum(-1)], dim=-1)


def gaussian_factors(
    points: torch.Tensor, h: int, w: int, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K, 2] normalised points -> the Gaussian's column [B, K, W] and row [B, K, H]
    factors, each summing to 1: the 2-D Gaussian is their outer product."""
    gx = (-((centres(w, points.device) - points[..., :1]) ** 2) / (2 * sigma**2)).softmax(-1)
    gy = (-((centres(h, points.device) - points[..., 1:]) ** 2) / (2 * sigma**2)).softmax(-1)
    return gx, gy


class _HeatmapTerms(torch.autograd.Function):
    """[B, K, H, W] heatmap logits and [B, K, 2] target points -> the soft-argmax points
    [B, K, 2] and the per-sample KL(Gaussian around the target || softmax heatmap), averaged
    over the K points [B]: a dense signal at every pixel, which trains on few images where the
    coordinate alone (one number per point) does not. One softmax serves both; the Gaussian is
    separable (a row and a column factor), so the target map is never built in the forward,
    and the backward is prob * (row + column terms) - target. Autograd through the textbook
    form (softmax twice, the full Gaussian and its log) took 3.7 ms per call at 96 px, batch
    16, 2 points, on one CPU thread; this takes 1.2 ms."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, points: torch.Tensor, sigma: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, k, h, w = logits.shape
        log_prob = logits.flatten(2).log_softmax(dim=-1).view(b * k, h, w)
        prob = log_prob.exp()
        x, y = centres(w, logits.device), centres(h, logits.device)
        gx, gy = (g.reshape(b * k, -1) for g in gaussian_factors(points, h, w, sigma))
        coords = torch.stack([prob.sum(1) @ x, prob.sum(2) @ y], dim=-1)
        # KL = sum t log t - sum t log_prob, t = gy gx^T
        neg_entropy = torch.special.xlogy(gx, gx).sum(-1) + torch.special.xlogy(gy, gy).sum(-1)
        cross = torch.bmm(gy[:, None, :], log_prob).squeeze(1).mul_(gx).sum(-1)
        ctx.save_for_backward(prob, gx, gy, coords, x, y)
        ctx.points = k
        kl = (neg_entropy - cross).view(b, k).mean(dim=1)
        return coords.view(b, k, 2), kl

    @staticmethod
    def backward(
        ctx, grad_coords: torch.Tensor, grad_kl: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        prob, gx, gy, coords, x, y = ctx.saved_tensors
        bk, h, w = prob.shape
        g_kl = (grad_kl / ctx.points).repeat_interleave(ctx.points)
        g_xy = grad_coords.reshape(bk, 2)
        # d/dz_ij = prob_ij (g_kl + g_x (x_j - cx) + g_y (y_i - cy)) - g_kl t_ij
        const = g_kl - (g_xy * coords).sum(-1)
        rows = const[:, None] + g_xy[:, 1:] * y
        cols = g_xy[:, :1] * x
        out = torch.add(rows[:, :, None], cols[:, None, :]).mul_(prob)
        out = torch.baddbmm(out, (gy * g_kl[:, None])[:, :, None], gx[:, None, :], alpha=-1)
        return out.view(-1, ctx.points, h, w), None, None


class HeatmapHead(nn.Module):
    """Decoder features [B, C, H, W] -> K heatmap logits [B, K, H, W]."""

    def __init__(self, in_channels: int, num_points: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, num_points, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)


class MeanPointDistance(Metric):
    """Mean Euclidean distance between predicted and true points, normalised (fraction of the
    image side) or in original-image pixels (through each sample's ``pixel_scale``)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, in_pixels: bool, point: int | None = None) -> None:
        """``point``: one point's index (the challenge reports disc and fovea apart), else all."""
        super().__init__()
        self.in_pixels = in_pixels
        self.point = point
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, pixel_scale: torch.Tensor) -> None:
        diff = pred.double() - target.double()
        if self.point is not None:
            diff = diff[:, self.point : self.point + 1]
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
    default_kd_loss = "mse"
    main_metric = "dist"

    def validate(self) -> None:
        if not self.spec.points:
            raise ValueError(f"task {self.name!r}: localization needs a list of points")
        if self.spec.loss not in ("mse", "l1"):
            raise ValueError(f"task {self.name!r}: loss must be 'mse' or 'l1'")
        if self.spec.head not in HEADS:
            raise ValueError(f"task {self.name!r}: head={self.spec.head!r} is not one of {HEADS}")
        if not 0 < self.spec.sigma < 1:
            raise ValueError(f"task {self.name!r}: sigma={self.spec.sigma} must be in (0, 1)")

    def score(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """1 - distance / half the image side (``dist`` is a fraction of the side), clipped at 0."""
        return (1 - 2 * values["dist"].float()).clamp(0, 1)

    @property
    def dense(self) -> bool:  # type: ignore[override]
        """The heatmap head reads the decoder's full-resolution features."""
        return self.spec.head == "heatmap"

    @property
    def num_points(self) -> int:
        return len(self.spec.points)

    @property
    def out_channels(self) -> int:
        return 2 * self.num_points

    def build_head(self, in_channels: int) -> nn.Module:
        if self.dense:
            return HeatmapHead(in_channels, self.num_points)
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

    def points(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw head output -> [B, K, 2] normalised points (points already: as they are)."""
        return soft_argmax(raw) if raw.ndim == 4 else raw

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        return self.points(raw).float()

    def exported(self, raw: torch.Tensor) -> torch.Tensor:
        return self.points(raw)

    def point_loss(self, raw: torch.Tensor, points: torch.Tensor, kind: str) -> torch.Tensor:
        """Coordinate loss, plus the heatmap term for the heatmap head."""
        if not self.dense:
            return elementwise_loss(raw, points, kind)
        coords, kl = _HeatmapTerms.apply(raw.float(), points.float(), float(self.spec.sigma))
        return elementwise_loss(coords, points, kind) + self.spec.heatmap_weight * kl

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.point_loss(pred, target, self.spec.loss)

    def channel_names(self) -> list[str]:
        return list(self.spec.points)

    def summarise(self, value: torch.Tensor, frame: Frame) -> dict[str, Any]:
        """Points in the original photograph's pixels, mapped back through the crop box."""
        (x0, y0), (w, h) = frame.origin, frame.scale
        names = self.channel_names()
        return {
            "points": {
                n: {"x": x0 + u * w, "y": y0 + v * h} for n, (u, v) in zip(names, value.tolist())
            }
        }

    def summary_line(self, summary: dict[str, Any]) -> str:
        return "  ".join(
            f"{k}=({p['x']:.0f}, {p['y']:.0f}) px" for k, p in summary["points"].items()
        )

    def overlay(self, value: torch.Tensor) -> Overlay:
        points = value.detach().float().cpu().tolist()
        return Overlay(points={n: (u, v) for n, (u, v) in zip(self.channel_names(), points)})

    def teacher_output(self, pred: torch.Tensor) -> torch.Tensor:
        return self.points(pred).float()

    def cache_shape(self, storage: CacheStorage) -> tuple[int, ...]:
        return (self.num_points, 2)

    def cache_dtype(self, storage: CacheStorage) -> np.dtype:
        return np.dtype(np.float32)

    def metrics(self) -> MetricCollection:
        """Mean distance (normalised and in original pixels), and each point's own distance in
        original pixels (``dist_px_<point>``), as the IDRiD challenge reports disc and fovea."""
        per_point = {
            f"dist_px_{name}": MeanPointDistance(in_pixels=True, point=i)
            for i, name in enumerate(self.spec.points)
        }
        return MetricCollection(
            {
                "dist": MeanPointDistance(in_pixels=False),
                "dist_px": MeanPointDistance(in_pixels=True),
                **per_point,
            }
        )

    def update_metrics(self, metrics, pred, target, batch) -> None:
        metrics.update(self.points(pred).float(), target, pixel_scale=batch["pixel_scale"])

    def resampled_metrics(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        extras: dict[str, torch.Tensor],
        draws: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``metrics()`` on every resample from each image's point distances, computed once
        (a resample's mean is a weighted sum: ``draw_counts``); rerunning the metrics per
        resample, with a soft-argmax of each heatmap each time, took a third of the demo
        report's time. Equal to the metrics on every resample (test_bootstrap)."""
        diff = self.points(pred).float().double() - target.double()  # N x P x 2, as update_metrics
        in_pixels = diff * extras["pixel_scale"].double()[:, None, :]
        counts = draw_counts(draws, len(pred))

        def mean(distances: torch.Tensor) -> torch.Tensor:  # N x P distances -> R means
            return (counts @ distances.mean(dim=1) / draws.shape[1]).float()  # as compute()

        out = {"dist": mean(diff.norm(dim=-1)), "dist_px": mean(in_pixels.norm(dim=-1))}
        for i, name in enumerate(self.spec.points):
            out[f"dist_px_{name}"] = mean(in_pixels[:, i : i + 1].norm(dim=-1))
        return out


@register_kd_loss("localization", "mse")
def mse_to_teacher_points(
    task: LocalizationTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """mean_k ||p_s,k - p_t,k||^2 / 2 (the mean squared coordinate error) to the teacher's points
    (the cache stores points whatever the teacher's head), plus, for a heatmap student,
    heatmap_weight * KL(Gaussian(p_t, sigma) || softmax heatmap); no temperature."""
    return task.point_loss(pred, teacher, "mse")
