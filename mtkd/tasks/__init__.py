"""Task kinds. Importing this package registers the built-in ones and their KD losses."""

from mtkd.tasks.base import (
    Annotation,
    CacheStorage,
    Frame,
    Overlay,
    Task,
    TaskSpec,
    build_tasks,
    masked_mean,
    register_task,
    task_kinds,
)
from mtkd.tasks.classification import ClassificationTask
from mtkd.tasks.kd_losses import TaskKD, kd_loss_names, register_kd_loss
from mtkd.tasks.localization import LocalizationTask
from mtkd.tasks.multilabel import MultilabelTask
from mtkd.tasks.regression import RegressionTask
from mtkd.tasks.segmentation import SegmentationTask

__all__ = [
    "Annotation",
    "CacheStorage",
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
    "build_tasks",
    "kd_loss_names",
    "masked_mean",
    "register_kd_loss",
    "register_task",
    "task_kinds",
]
