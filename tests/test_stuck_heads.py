"""Stuck heads are named after a quarter of the epochs: a global head at its class prior, a
dense head ranking pixels well with no probability above the threshold; learning heads are not."""

from __future__ import annotations

import logging

import pytest
import torch

from data_modules.datamodule import FundusDataModule
from mtkd.config import to_container
from mtkd.modules.teacher import TeacherModule
from mtkd.stages import make_trainer
from mtkd.tasks import build_tasks
from tests.conftest import distill_cfg

TASKS = build_tasks(
    {
        "grade": {"kind": "classification", "num_classes": 3},
        "anatomy": {"kind": "segmentation", "classes": ["vessels", "optic_disc"]},
    }
)


def _classification_values(logits: torch.Tensor, target: torch.Tensor) -> dict:
    task = TASKS["grade"]
    metrics, health = task.metrics(), task.health_metrics()
    for collection in (metrics, health):
        task.update_metrics(collection, logits, target, {})
    return {**metrics.compute(), **health.compute()}


def _segmentation_values(probs: torch.Tensor, target: torch.Tensor) -> dict:
    task = TASKS["anatomy"]
    logits = torch.logit(probs)
    metrics, health = task.metrics(), task.health_metrics()
    for collection in (metrics, health):
        task.update_metrics(collection, logits, target, {})
    return {**metrics.compute(), **health.compute()}


@pytest.mark.unit
def test_a_classification_head_at_its_prior_is_named_and_a_learning_one_is_not() -> None:
    target = torch.tensor([0, 1, 2, 0, 1, 2, 1, 1])
    prior = torch.tensor([0.1, 2.0, -0.3]).expand(len(target), 3)  # class 1 for every image
    hint = TASKS["grade"].stuck_hint(_classification_values(prior, target))
    assert hint is not None and "class 1 for every one of its 8 validation images" in hint
    assert "class prior" in hint and "tasks.grade.weight" in hint
    learning = torch.nn.functional.one_hot(target, 3).float() * 3
    learning[0] = torch.tensor([0.0, 3.0, 0.0])  # one mistake: still learning, not stuck
    assert TASKS["grade"].stuck_hint(_classification_values(learning, target)) is None


@pytest.mark.unit
def test_a_dense_head_below_threshold_with_a_good_ranking_is_named() -> None:
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(4, 2, 16, 16, generator=gen) > 0.8).long()
    # vessels: ranked perfectly, every probability below 0.5; optic disc: learned.
    probs = torch.stack(
        [0.1 + 0.35 * target[:, 0].float(), 0.05 + 0.9 * target[:, 1].float()], dim=1
    )
    values = _segmentation_values(probs, target)
    assert float(values["max_prob"][0]) == pytest.approx(0.45, abs=1e-5)
    hint = TASKS["anatomy"].stuck_hint(values)
    assert hint is not None and "vessels (highest probability 0.450" in hint
    assert "optic_disc" not in hint and "tasks.anatomy.pos_weight" in hint
    # Below threshold without a ranking (AUROC 0.5) is an untrained head, not this failure.
    flat = torch.full_like(probs, 0.3)
    assert TASKS["anatomy"].stuck_hint(_segmentation_values(flat, target)) is None
    learned = 0.05 + 0.9 * target.float()
    assert TASKS["anatomy"].stuck_hint(_segmentation_values(learned, target)) is None


@pytest.mark.integration
def test_a_run_warns_once_naming_a_head_stuck_at_its_prior(
    synth_root, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = distill_cfg(synth_root, tmp_path, "kd=none", "trainer.max_epochs=2")
    cfg.stage = "teacher"
    module = TeacherModule(to_container(cfg))
    head = module.net.heads["dr_grade"][1]
    with torch.no_grad():  # every image to class 0, far from any other class
        head.weight.zero_()
        head.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0, 0.0]))
    trainer = make_trainer(cfg, tmp_path, [], logger=False)
    caplog.set_level(logging.WARNING, logger="mtkd")
    trainer.fit(module, datamodule=FundusDataModule(cfg.data, module.tasks))
    stuck = [r.getMessage() for r in caplog.records if "class prior" in r.getMessage()]
    # Named once (epoch 1 of 2 is past a quarter; epoch 2 is not asked again), by name.
    assert [m for m in stuck if m.startswith("task 'dr_grade'")] == [
        next(m for m in stuck if m.startswith("task 'dr_grade' after 1 of 2 epochs"))
    ]


@pytest.mark.unit
def test_a_one_class_dense_head_below_threshold_is_named() -> None:
    task = build_tasks({"disc": {"kind": "segmentation", "classes": ["optic_disc"]}})["disc"]
    target = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.7).long()
    logits = torch.logit(0.1 + 0.3 * target.float())  # ranked perfectly, all below 0.5
    health = task.health_metrics()
    task.update_metrics(health, logits, target, {})
    hint = task.stuck_hint(health.compute())
    assert hint is not None and "optic_disc (highest probability 0.400, pixel AUROC 1.00)" in hint


@pytest.mark.unit
def test_the_pixel_ranking_check_reads_a_grid_of_about_a_thousand_pixels_per_image() -> None:
    """At 96 px every third row and column (32 x 32 per image) feeds the AUROC, and a head that
    ranks well below the threshold is still named; 16 px maps are read whole."""
    gen = torch.Generator().manual_seed(2)
    target = (torch.rand(4, 2, 96, 96, generator=gen) > 0.8).long()
    probs = 0.1 + 0.35 * target.float()  # both classes ranked perfectly, all below 0.5
    task = TASKS["anatomy"]
    health = task.health_metrics()
    task.update_metrics(health, torch.logit(probs), target, {})
    assert int(health["auroc"].metric.confmat[0, 0].sum()) == 4 * 32 * 32
    assert "vessels (highest probability 0.450, pixel AUROC 1.00)" in task.stuck_hint(
        health.compute()
    )
    health.reset()
    task.update_metrics(health, torch.logit(probs[..., :16, :16]), target[..., :16, :16], {})
    assert int(health["auroc"].metric.confmat[0, 0].sum()) == 4 * 16 * 16
