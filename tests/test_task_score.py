"""``Task.score``: each kind's main metric on one [0, 1], higher-is-better scale with 0 at chance,
the terms of ``val/score`` (the default checkpoint monitor)."""

from __future__ import annotations

import pytest
import torch

from mtkd.tasks import build_tasks

pytestmark = pytest.mark.unit

SPECS = {
    "grade": {"kind": "classification", "num_classes": 5},
    "lesions": {"kind": "segmentation", "classes": ["a", "b"]},
    "signs": {"kind": "multilabel", "classes": ["a", "b"]},
    "cdr": {"kind": "regression"},
    "points": {"kind": "localization", "points": ["disc"]},
}


@pytest.mark.parametrize(
    ("task", "values", "expected"),
    [
        ("grade", {"kappa": 0.6}, 0.6),
        ("grade", {"kappa": -0.2}, 0.0),  # worse than chance is chance
        ("lesions", {"dice": 0.35}, 0.35),
        ("signs", {"auroc": 0.5}, 0.0),  # chance
        ("signs", {"auroc": 0.8}, 0.6),
        ("cdr", {"r2": 0.4, "mae": 0.05}, 0.4),
        ("cdr", {"r2": -3.0, "mae": 0.9}, 0.0),  # worse than the mean
        ("cdr", {"r2": float("nan"), "mae": 0.1}, 0.0),  # < 2 validation samples
        ("points", {"dist": 0.05}, 0.9),
        ("points", {"dist": 0.7}, 0.0),
    ],
)
def test_each_kind_scores_its_main_metric_on_one_scale(task, values, expected):
    tasks = build_tasks(SPECS)
    got = tasks[task].score({k: torch.tensor(v) for k, v in values.items()})
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_a_lower_is_better_metric_of_a_plugin_kind_maps_through_one_over_one_plus():
    from types import SimpleNamespace

    from mtkd.tasks.base import Task

    lower = SimpleNamespace(main_metric="err", higher_is_better=lambda: False)  # all score reads
    assert float(Task.score(lower, {"err": torch.tensor(3.0)})) == 0.25


#: what each built-in kind's main metric is, and which way it improves
DIRECTIONS = {
    "grade": ("kappa", True),
    "lesions": ("dice", True),
    "signs": ("auroc", True),
    "cdr": ("mae", False),
    "points": ("dist", False),
}


@pytest.mark.parametrize("task", sorted(SPECS))
def test_each_kind_takes_its_direction_from_its_torchmetrics_metric(task):
    """The one owner of a direction is the metric's ``higher_is_better``: what report, study,
    score and the checkpoint monitor read through ``Task.higher_is_better``."""
    built = build_tasks(SPECS)[task]
    metric, higher = DIRECTIONS[task]
    assert built.main_metric == metric
    assert built.higher_is_better() is higher
    assert built.metrics()[metric].higher_is_better is higher


def test_a_loss_is_better_lower_and_a_metric_without_a_direction_is_refused():
    task = build_tasks(SPECS)["grade"]
    assert task.higher_is_better("loss") is False
    with pytest.raises(LookupError, match="has no metric 'bogus' with a direction"):
        task.higher_is_better("bogus")


@pytest.mark.integration
def test_val_score_is_the_task_weighted_mean_of_the_logged_main_metrics(runs):
    """What the default checkpoint monitor reads, recomputed from the run's own validation
    metrics."""
    import json

    from mtkd.modules.checkpoint import read_checkpoint

    saved = read_checkpoint(runs.teacher)["hyper_parameters"]["config"]
    tasks = build_tasks(saved["tasks"])
    assert saved["run"]["monitor"] is None  # the default monitor chose best.ckpt
    logged = json.loads((runs.teacher_dir / "metrics_val.json").read_text())["metrics"]
    total = weights = 0.0
    for name, task in tasks.items():
        values = {
            k.split("/")[2]: torch.tensor(v)
            for k, v in logged.items()
            if k.startswith(f"val/{name}/")
        }
        total += float(task.score(values)) * task.weight
        weights += task.weight
    assert logged["val/score"] == pytest.approx(total / weights, abs=1e-5)
