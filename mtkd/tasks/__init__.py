"""Task kinds. Importing this package registers the built-in ones."""

from mtkd.tasks.base import (
    Annotation,
    CacheStorage,
    Task,
    TaskSpec,
    build_tasks,
    masked_mean,
    register_task,
    task_kinds,
)
from mtkd.tasks.classification import ClassificationTask
from mtkd.tasks.localization import LocalizationTask
from mtkd.tasks.multilabel import MultilabelTask
from mtkd.tasks.regression import RegressionTask
from mtkd.tasks.segmentation import SegmentationTask

__all__ = [
    "Annotation",
    "CacheStorage",
    "ClassificationTask",
    "LocalizationTask",
    "MultilabelTask",
    "RegressionTask",
    "SegmentationTask",
    "Task",
    "TaskSpec",
    "build_tasks",
    "masked_mean",
    "register_task",
    "task_kinds",
]
