"""The textbook forms of the fused dense losses (segmentation ``kl_dice``, the heatmap point
loss): the reference that tests/test_kd_loss_fused.py checks the fused ones against, and the
"before" arm that bench/bench_kd.py times them against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-4


def reference_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per sample over the classes the target shows."""
    prob, target = prob.flatten(2), target.flatten(2)
    dice = (2 * (prob * target).sum(-1) + 1.0) / (prob.sum(-1) + target.sum(-1) + 1.0)
    shown = (target.amax(-1) > 0.5).to(dice.dtype)
    return ((1.0 - dice) * shown).sum(dim=1) / shown.sum(dim=1).clamp(min=1.0)


def reference_kl_dice(
    pred: torch.Tensor, teacher: torch.Tensor, temperature: float, dice_weight: float
) -> torch.Tensor:
    """The straightforward form: BCE with logits minus the teacher's entropy, plus soft Dice
    against the teacher's mask (its map at >= 0.5)."""
    p = teacher.clamp(EPS, 1 - EPS)
    if temperature != 1.0:
        p = torch.sigmoid(torch.logit(p) / temperature)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    kl = F.binary_cross_entropy_with_logits(pred / temperature, p, reduction="none") - entropy
    kl = kl.flatten(1).mean(dim=1) * temperature**2
    mask = (teacher >= 0.5).to(teacher.dtype)
    return kl + dice_weight * reference_dice_loss(torch.sigmoid(pred), mask)


def reference_point_loss(
    raw: torch.Tensor, points: torch.Tensor, kind: str, sigma: float, weight: float
) -> torch.Tensor:
    """The textbook heatmap point loss: coordinate loss of the soft-argmax, plus the KL from the
    full 2-D Gaussian around ``points`` to the softmax heatmap."""
    b, k, h, w = raw.shape
    ys = (torch.arange(h, dtype=raw.dtype, device=raw.device) + 0.5) / h
    xs = (torch.arange(w, dtype=raw.dtype, device=raw.device) + 0.5) / w
    y, x = (g.flatten() for g in torch.meshgrid(ys, xs, indexing="ij"))
    prob = raw.flatten(2).softmax(-1)
    coords = torch.stack([(prob * x).sum(-1), (prob * y).sum(-1)], dim=-1)
    diff = (coords - points).flatten(1)
    coord_loss = (diff**2 if kind == "mse" else diff.abs()).mean(1)
    d2 = (x - points[..., :1]) ** 2 + (y - points[..., 1:]) ** 2
    target = (-d2 / (2 * sigma**2)).softmax(-1)
    kl = (target * (target.clamp_min(1e-12).log() - raw.flatten(2).log_softmax(-1))).sum(-1)
    return coord_loss + weight * kl.mean(1)
