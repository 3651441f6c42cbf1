"""The fused dense losses (segmentation ``kl_dice``, the heatmap point loss) against the
textbook forms they replace: the same per-sample value (uncertainty weighting reads loss
values) and the same gradient w.r.t. the student's logits (so the same training), over
temperatures and extreme teacher maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtkd.tasks import build_tasks
from tests.textbook_losses import reference_dice_loss, reference_kl_dice, reference_point_loss


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
