"""Task kinds. Importing this package registers the built-in ones and their KD losses, so
``build_tasks`` (here, after those imports) knows every built-in kind."""

from __future__ import annotations

from typing import Any

from mtkd.kd.losses import TaskKD, kd_loss_names, parse_task_kd, register_kd_loss
from mtkd.tasks.base import (
    TASK_KINDS,
    Annotation,
    Frame,
    Overlay,
    Task,
    TaskSpec,
    masked_mean,
    register_task,
    task_kinds,
)
from mtkd.tasks.classification import ClassificationTask
from mtkd.tasks.localization import LocalizationTask
from mtkd.tasks.multilabel import MultilabelTask
from mtkd.tasks.regression import RegressionTask
from mtkd.tasks.segmentation import SegmentationTask
from mtkd.tasks.text import TextTask

__all__ = [
    "Annotation",
    "ClassificationTask",
    "Frame",
    "LocalizationTask",
    "MultilabelTask",
    "Overlay",
    "RegressionTask",
    "SegmentationTask",
    "Task",
    "TaskKD",
    "TaskSpec",
    "TextTask",
    "build_tasks",
    "kd_loss_names",
    "masked_mean",
    "register_kd_loss",
    "register_task",
    "task_kinds",
]


def build_tasks(
    specs: dict[str, dict[str, Any]], kd: dict[str, dict[str, Any]] | None = None
) -> dict[str, Task]:
    """Instantiate the configured task set, with errors that list the registered kinds. ``kd``:
    the ``kd.tasks`` entries (per-task KD options, e.g. the KD loss), checked here."""
    tasks = {}
    for name, raw in specs.items():
        raw = dict(raw or {})
        task_class = TASK_KINDS.get(raw.get("kind"), key=f"tasks.{name}.kind")
        tasks[name] = task_class(name, raw)
    if kd is not None:
        for name, task in tasks.items():
            task.configure_kd(parse_task_kd(name, kd.get(name)))
    return tasks
