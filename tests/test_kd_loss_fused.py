"""The fused dense losses (segmentation ``kl_dice``, the heatmap point loss) against the
textbook forms they replace: the same per-sample value (uncertainty weighting reads loss
values) and the same gradient w.r.t. the student's logits (so the same training), over
temperatures and extreme teacher maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtkd.tasks import build_tasks

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
    """The straightforward form: BCE with logits minus the teacher's entropy, plus soft Dice."""
    p = teacher.clamp(EPS, 1 - EPS)
    if temperature != 1.0:
        p = torch.sigmoid(torch.logit(p) / temperature)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    kl = F.binary_cross_entropy_with_logits(pred / temperature, p, reduction="none") - entropy
    kl = kl.flatten(1).mean(dim=1) * temperature**2
    return kl + dice_weight * reference_dice_loss(torch.sigmoid(pred), teacher)


def inputs(extreme: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and teacher maps, 4 samples x 3 classes x 16 x 12; ``extreme``: teacher maps of
    exact 0 and 1 and logits up to +-60 (sigmoid saturates in fp32)."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 3, 16, 12, generator=g) * 3
    teacher = torch.rand(4, 3, 16, 12, generator=g) ** 3
    teacher[1, 1] = 0.0  # a class the sample does not show: Dice leaves it out
    if extreme:
        teacher = (teacher > 0.3).float()
        pred[0] = pred[0].sign() * 60
    return pred, teacher


def value_and_grad(fn, pred: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor):
    """Per-sample loss and d(sum_b weights_b loss_b)/d pred in ``pred``'s dtype (the weights
    differ per sample: the backward must keep the samples apart)."""
    z = pred.clone().requires_grad_(True)
    loss = fn(z, teacher)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach().float(), z.grad.float()


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 0.5])
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("dice_weight", [1.0, 0.0])
def test_fused_kl_dice_matches_the_reference(
    temperature: float, extreme: bool, dice_weight: float
) -> None:
    task = build_tasks(
        {"seg": {"kind": "segmentation", "classes": ["a", "b", "c"], "dice_weight": dice_weight}}
    )["seg"]
    assert task.kd_loss_name == "kl_dice"
    pred, teacher = inputs(extreme)
    assert pred.dtype == torch.float32
    weights = torch.tensor([1.0, 0.5, 2.0, -1.0])
    value, grad = value_and_grad(
        lambda z, t: task.kd_loss(z, t, temperature), pred, teacher, weights
    )
    # in float64: the fp32 reference itself is NaN at T < 1 on a saturated teacher
    # ((1 - q) log(1 - q) with q rounded to 1), where the fused loss stays finite
    ref_value, ref_grad = value_and_grad(
        lambda z, t: reference_kl_dice(z, t, temperature, dice_weight),
        pred.double(),
        teacher.double(),
        weights,
    )
    assert value.shape == (4,)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
    # gradients are ~1 / pixels per element: compared relative to the largest one
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad / scale, ref_grad / scale, rtol=0, atol=1e-5)


@pytest.mark.unit
def test_supervised_dice_term_is_unchanged() -> None:
    """The supervised loss shares the Dice terms with the fused KD loss."""
    task = build_tasks({"seg": {"kind": "segmentation", "classes": ["a", "b", "c"]}})["seg"]
    pred, teacher = inputs(extreme=False)
    mask = (teacher > 0.3).float()

    def reference(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(z, m, reduction="none").flatten(1).mean(1)
        return bce + reference_dice_loss(torch.sigmoid(z), m)

    weights = torch.ones(4)
    value, grad = value_and_grad(task.loss, pred, mask, weights)
    ref_value, ref_grad = value_and_grad(reference, pred, mask, weights)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad / scale, ref_grad / scale, rtol=0, atol=1e-5)


def reference_point_loss(
    raw: torch.Tensor, points: torch.Tensor, kind: str, sigma: float, weight: float
) -> torch.Tensor:
    """The textbook heatmap point loss: coordinate loss of the soft-argmax, plus the KL from the
    full 2-D Gaussian around ``points`` to the softmax heatmap."""
    b, k, h, w = raw.shape
    ys = (torch.arange(h, dtype=raw.dtype) + 0.5) / h
    xs = (torch.arange(w, dtype=raw.dtype) + 0.5) / w
    y, x = (g.flatten() for g in torch.meshgrid(ys, xs, indexing="ij"))
    prob = raw.flatten(2).softmax(-1)
    coords = torch.stack([(prob * x).sum(-1), (prob * y).sum(-1)], dim=-1)
    diff = (coords - points).flatten(1)
    coord_loss = (diff**2 if kind == "mse" else diff.abs()).mean(1)
    d2 = (x - points[..., :1]) ** 2 + (y - points[..., 1:]) ** 2
    target = (-d2 / (2 * sigma**2)).softmax(-1)
    kl = (target * (target.clamp_min(1e-12).log() - raw.flatten(2).log_softmax(-1))).sum(-1)
    return coord_loss + weight * kl.mean(1)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["mse", "l1"])
@pytest.mark.parametrize("sharp", [False, True])
def test_fused_heatmap_point_loss_matches_the_reference(kind: str, sharp: bool) -> None:
    """The heatmap head's point loss (supervised: l1, KD to the teacher's points: mse), points
    at the border too; ``sharp``: logits of a near one-hot heatmap."""
    task = build_tasks(
        {"pts": {"kind": "localization", "points": ["a", "b"], "head": "heatmap", "loss": kind}}
    )["pts"]
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(3, 2, 20, 14, generator=g) * (40 if sharp else 2)
    points = torch.rand(3, 2, 2, generator=g)
    points[0, 0] = torch.tensor([0.0, 1.0])
    weights = torch.tensor([1.0, -0.5, 2.0])
    spec = task.spec
    value, grad = value_and_grad(lambda z, t: task.point_loss(z, t, kind), raw, points, weights)
    ref_value, ref_grad = value_and_grad(
        lambda z, t: reference_point_loss(z, t, kind, spec.sigma, spec.heatmap_weight),
        raw.double(),
        points.double(),
        weights,
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad / scale, ref_grad / scale, rtol=0, atol=1e-5)
    if kind == "mse":  # the KD loss is the same function against the teacher's points
        kd, _ = value_and_grad(lambda z, t: task.kd_loss(z, t, 1.0), raw, points, weights)
        torch.testing.assert_close(kd, value)
