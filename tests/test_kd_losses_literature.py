"""The literature KD losses of the registry: decoupled KD (``dkd``, classification) and
channel-wise distillation (``cwd``, segmentation), against values worked out by hand on tiny
inputs, the identities the papers state, and extreme inputs."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd.config import to_container
from mtkd.run_config import load_config
from mtkd.tasks import build_tasks
from mtkd.tasks.classification import DKD_ALPHA, DKD_BETA, decoupled_kd_terms


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) of two written-out distributions."""
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def classification(num_classes: int = 3, loss: str = "dkd"):
    specs = {"grade": {"kind": "classification", "num_classes": num_classes}}
    return build_tasks(specs, {"grade": {"loss": loss}})["grade"]


def segmentation(loss: str = "cwd"):
    specs = {"seg": {"kind": "segmentation", "classes": ["a", "b"]}}
    return build_tasks(specs, {"seg": {"loss": loss}})["seg"]


# -- dkd ----------------------------------------------------------------------------------------
# Two samples whose softmax(z / T) are these probabilities (z = T log p). Sample 0: the teacher's
# argmax is class 0, the student's class 2 (the target follows the teacher); sample 1: class 2.
TEACHER_P = [[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]
STUDENT_P = [[0.25, 0.25, 0.5], [0.2, 0.2, 0.6]]
# by hand: b = (p_target, 1 - p_target); p^ = the non-target probabilities renormalised
TCKD = [kl([0.5, 0.5], [0.25, 0.75]), kl([0.7, 0.3], [0.6, 0.4])]
NCKD = [kl([0.6, 0.4], [1 / 3, 2 / 3]), kl([1 / 3, 2 / 3], [0.5, 0.5])]


def logits(probs: list[list[float]], temperature: float) -> torch.Tensor:
    return temperature * torch.tensor(probs).log()


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_dkd_matches_the_hand_computed_value(temperature: float) -> None:
    task = classification()
    assert (DKD_ALPHA, DKD_BETA) == (1.0, 8.0)
    pred, teacher = logits(STUDENT_P, temperature), logits(TEACHER_P, temperature)
    tckd, nckd = decoupled_kd_terms(pred, teacher, temperature)
    t2 = temperature**2
    assert tckd.tolist() == pytest.approx([t2 * v for v in TCKD], rel=1e-5)
    assert nckd.tolist() == pytest.approx([t2 * v for v in NCKD], rel=1e-5)
    want = [t2 * (1.0 * a + 8.0 * b) for a, b in zip(TCKD, NCKD)]
    got = task.kd_loss(pred, teacher, temperature)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(want, rel=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_terms_recompose_classic_kd(temperature: float) -> None:
    """The paper's identity KD = TCKD + (1 - p_t,target) NCKD, against the registered ``kl``."""
    g = torch.Generator().manual_seed(0)
    pred, teacher = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    tckd, nckd = decoupled_kd_terms(pred, teacher, temperature)
    p_target = torch.softmax(teacher / temperature, dim=1).amax(dim=1)
    kd = classification(5, loss="kl").kd_loss(pred, teacher, temperature)
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kd, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_dkd_is_zero_when_the_student_is_the_teacher() -> None:
    teacher = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -3.0]])
    task = classification()
    for pred in (teacher, teacher + 7.0):  # logits up to a per-sample constant
        assert task.kd_loss(pred, teacher, 4.0).abs().max().item() < 1e-6


@pytest.mark.unit
def test_dkd_gradient_reaches_the_student_only() -> None:
    pred = logits(STUDENT_P, 2.0).requires_grad_(True)
    teacher = logits(TEACHER_P, 2.0).requires_grad_(True)
    classification().kd_loss(pred, teacher, 2.0).sum().backward()
    assert teacher.grad is None
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_dkd_is_finite_for_extreme_logits(temperature: float) -> None:
    pred = torch.tensor([[60.0, -60.0, 0.0], [-60.0, -60.0, 60.0]], requires_grad=True)
    teacher = torch.tensor([[-60.0, 60.0, 0.0], [60.0, -60.0, -60.0]])
    loss = classification().kd_loss(pred, teacher, temperature)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss > 0).all()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.unit
def test_dkd_with_two_classes_is_tckd_alone() -> None:
    """One non-target class: its renormalised distribution is 1 for both networks, NCKD = 0."""
    pred, teacher = torch.tensor([[math.log(0.2), math.log(0.8)]]), torch.tensor([[0.0, -1.0]])
    p = 1 / (1 + math.exp(-1.0))  # the teacher's probability of class 0, its argmax
    got = classification(2).kd_loss(pred, teacher, 1.0).item()
    assert got == pytest.approx(DKD_ALPHA * kl([p, 1 - p], [0.2, 0.8]), rel=1e-5)


# -- cwd ----------------------------------------------------------------------------------------
def cwd_inputs(temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample, 2 channels x 3 x 3, built so that phi = softmax(y / T) over the 9 positions is
    a written-out distribution: teacher logit(m) = T log 3 (channel 0) and T log 4 (channel 1)
    at one pixel and 0 (m = 0.5) elsewhere; student logits 0 everywhere (channel 0) and T log 2
    at another pixel (channel 1)."""
    teacher = torch.full((1, 2, 3, 3), 0.5)
    teacher[0, 0, 1, 1] = 3**temperature / (1 + 3**temperature)
    teacher[0, 1, 0, 0] = 4**temperature / (1 + 4**temperature)
    pred = torch.zeros(1, 2, 3, 3)
    pred[0, 1, 2, 2] = temperature * math.log(2)
    return pred, teacher


# by hand: channel 0 teacher (3, 1 x 8) / 11 vs uniform 1/9; channel 1 teacher (4, 1 x 8) / 12
# vs student (2 at another pixel, 1 x 8) / 10
CWD_KL = [
    kl([3 / 11] + [1 / 11] * 8, [1 / 9] * 9),
    kl([4 / 12, 1 / 12] + [1 / 12] * 7, [1 / 10, 2 / 10] + [1 / 10] * 7),
]


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cwd_matches_the_hand_computed_value(temperature: float) -> None:
    task = segmentation()
    pred, teacher = cwd_inputs(temperature)
    # a second sample where the student already is the teacher: 0, kept apart from the first
    same = torch.logit(teacher)
    got = task.kd_loss(torch.cat([pred, same]), torch.cat([teacher, teacher]), temperature)
    assert got.shape == (2,)
    want = temperature**2 / 2 * sum(CWD_KL)
    assert got[0].item() == pytest.approx(want, rel=1e-4)
    assert abs(got[1].item()) < 1e-6


@pytest.mark.unit
def test_cwd_ignores_a_per_channel_shift_of_the_student_logits() -> None:
    """The softmax is over space: adding a constant to one channel's logits changes nothing; a
    softmax over channels would change."""
    g = torch.Generator().manual_seed(0)
    pred, teacher = torch.randn(2, 2, 5, 4, generator=g), torch.rand(2, 2, 5, 4, generator=g)
    shift = torch.tensor([3.0, -5.0]).view(1, 2, 1, 1)
    task = segmentation()
    base = task.kd_loss(pred, teacher, 2.0)
    torch.testing.assert_close(task.kd_loss(pred + shift, teacher, 2.0), base)
    assert (base > 0).all()


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_cwd_is_finite_for_binary_teacher_maps_and_extreme_logits(temperature: float) -> None:
    g = torch.Generator().manual_seed(1)
    teacher = (torch.rand(2, 2, 6, 6, generator=g) > 0.5).float()
    teacher[1, 1] = 0.0  # an empty map: the student is asked for a flat one
    teacher[0, 0] = 1.0
    pred = (torch.randn(2, 2, 6, 6, generator=g).sign() * 60).requires_grad_(True)
    loss = segmentation().kd_loss(pred, teacher, temperature)
    loss.sum().backward()
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.unit
def test_cwd_gradient_reaches_the_student_only_and_teacher_maps_are_resized() -> None:
    task = segmentation()
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 2, 3, 3, generator=g).requires_grad_(True)
    teacher = torch.rand(2, 2, 6, 6, generator=g).requires_grad_(True)
    loss = task.kd_loss(pred, teacher, 1.0)
    loss.sum().backward()
    assert teacher.grad is None and pred.grad.abs().sum() > 0
    resized = task.teacher_at(teacher.detach(), (3, 3))
    torch.testing.assert_close(loss.detach(), task.kd_loss(pred.detach(), resized, 1.0))


# -- selection ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_dkd_and_cwd_are_picked_per_task_through_the_config() -> None:
    overrides = ["kd.tasks.dr_grade.loss=dkd", "kd.tasks.lesions.loss=cwd"]
    cfg = to_container(load_config("distill", overrides))
    tasks = build_tasks(cfg["tasks"], cfg["kd"]["tasks"])
    assert tasks["dr_grade"].kd_loss_name == "dkd"
    assert tasks["lesions"].kd_loss_name == "cwd"
    assert tasks["dme_risk"].kd_loss_name == "kl"  # the other tasks keep their kind's default
    dr = tasks["dr_grade"]
    pred, teacher = torch.zeros(1, dr.out_channels), torch.zeros(1, dr.out_channels)
    teacher[0, 1] = 2.0
    tckd, nckd = decoupled_kd_terms(pred, teacher, 4.0)
    torch.testing.assert_close(dr.kd_loss(pred, teacher, 4.0), DKD_ALPHA * tckd + DKD_BETA * nckd)
