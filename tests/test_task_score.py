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

    lower = SimpleNamespace(monitor=("err", "min"))  # all the default score reads
    assert float(Task.score(lower, {"err": torch.tensor(3.0)})) == 0.25


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
