"""What the data module needs from the outside, as duck types: data_modules imports nothing of
mtkd, and mtkd's ``Task`` and ``TeacherCache`` satisfy these protocols without naming them.

``Annotation`` is the one shape a task reads its target from, built here after resizing and
augmentation (``mtkd.tasks`` re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


@dataclass
class Annotation:
    """What a task may read its target from, after resizing and augmentation.

    ``masks`` are H x W float arrays in {0,1}; ``points`` are normalised (x, y) in [0,1]^2;
    ``texts`` are free texts (a written diagnosis), which augmentation leaves alone.
    """

    labels: dict[str, float]
    masks: dict[str, np.ndarray]
    points: dict[str, tuple[float, float]]
    size: int
    texts: dict[str, str] = field(default_factory=dict)


class DatasetTask(Protocol):
    """The part of a task (``mtkd.tasks.Task``) the dataset uses."""

    #: how the task's teacher output follows augmentation: a key of ``pack.CARRIERS``
    teacher_spatial: str

    def required_masks(self) -> list[str]: ...

    def target(self, ann: Annotation) -> torch.Tensor | None: ...

    def empty_target(self, size: int) -> torch.Tensor: ...

    def sample_problems(
        self,
        labels: dict[str, float],
        masks: set[str],
        points: dict[str, tuple[float, float]],
        texts: dict[str, str],
    ) -> list[str] | None: ...


class TeacherOutputs(Protocol):
    """What the dataset needs from a teacher-output cache (``mtkd.kd.cache.TeacherCache``)."""

    views: int
    #: the arrays ``get`` returns besides the tasks' outputs (teacher feature maps) -> how each
    #: follows the image (a ``data_modules.pack.CARRIERS`` key)
    carried: dict[str, str]

    def get(self, sample_id: str, view: int = 0) -> dict[str, np.ndarray]: ...

    def view_seed(self, sample_id: str, view: int) -> int: ...
