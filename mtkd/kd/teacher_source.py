"""Where a student's teacher outputs come from (``kd.mode``): the cache written by
``cache-teacher``, the frozen teacher run on the same view, or no teacher at all (no KD).

A source is a small object injected into ``StudentModule``; it is not an ``nn.Module``, so
Lightning neither trains, checkpoints nor counts the teacher it holds. A new source is one class
decorated with ``@register_teacher_source("name")`` in a plugin module; the keyword parameters of
its ``__init__`` are the options ``kd.mode={name: ..., option: value}`` sets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from data_modules.registry import Registry
from mtkd.config import to_container
from mtkd.kd.cache import TeacherCache, recorded_reach, taught_masks
from mtkd.kd.ensemble import TeacherEnsemble, announce, distill_teachers


class TeacherSource:
    """The teacher outputs of a batch, ``{task: tensor}`` for the tasks a teacher covers."""

    #: the ``kd.mode`` value that selects this source
    name: ClassVar[str]
    #: whether the data module must carry a teacher cache (``batch["teacher"]``): such a
    #: source is built with the opened, checked cache (``build_teacher_source``)
    reads_cache: ClassVar[bool] = False
    #: the checked teacher cache the run reads, for a source that ``reads_cache``
    cache: TeacherCache | None = None
    #: the tasks and embeddings taught on some data sources' images only (``source_reach``),
    #: known after ``setup``
    reach: dict[str, list[list[str] | None]] = {}

    def setup(self, cfg: DictConfig) -> None:
        """Prepare before training (``cfg``: the student's run config)."""

    def to(self, device: torch.device) -> None:
        """Move whatever the source runs onto the student's device."""

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def taught(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per entry of ``reach``, which images of the batch a teacher teaches (by their data
        source); the KD loss leaves the others out."""
        if not self.reach:
            return {}
        device = batch["image"].device
        return {n: m.to(device) for n, m in taught_masks(self.reach, batch["source"]).items()}


#: ``kd.mode`` -> source class, built with the choice's options
TEACHER_SOURCES: Registry[type[TeacherSource]] = Registry(
    "kd.mode", "teacher source", "@register_teacher_source(name)"
)


def register_teacher_source(name: str) -> Callable[[type[TeacherSource]], type[TeacherSource]]:
    """Class decorator: ``kd.mode=name`` selects this teacher source; the keyword parameters of
    its ``__init__`` are its options (``kd.mode={name: ..., option: value}``)."""

    def decorate(cls: type[TeacherSource]) -> type[TeacherSource]:
        TEACHER_SOURCES.register(name, cls)
        cls.name = name
        return cls

    return decorate


def reads_cache(choice: str | Mapping[str, Any]) -> bool:
    """Whether ``kd.mode``'s source reads the teacher cache, so the run must open one first."""
    return TEACHER_SOURCES.resolve(choice)[0].reads_cache


def build_teacher_source(
    choice: str | Mapping[str, Any], cache: TeacherCache | None = None
) -> TeacherSource:
    """A fresh source for ``kd.mode`` (a name or ``{name: ..., **options}``); one that reads
    the teacher cache gets ``cache`` (opened and checked: ``stages.open_checked_cache``)."""
    source, options = TEACHER_SOURCES.resolve(choice)
    return source(cache, **options) if source.reads_cache else source(**options)


@register_teacher_source("none")
class NoTeacher(TeacherSource):
    """No KD: no task has a teacher output, so every task trains on its labels only."""

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {}


@register_teacher_source("cached")
class CachedTeacher(TeacherSource):
    """The teacher outputs the data module read from ``cache`` for this sample and view.
    ``cache`` is positional only: the opened cache passed in code, not a ``kd.mode`` option.
    A student loaded for inference holds one without a cache."""

    reads_cache = True

    def __init__(self, cache: TeacherCache | None = None, /) -> None:
        self.cache = cache

    def setup(self, cfg: DictConfig) -> None:
        if self.cache is None:
            raise ValueError(
                "kd.mode=cached reads the teacher cache, and this student was built without one: "
                "train it with `mtkd distill kd.cache_dir=DIR`, or in code pass "
                "build_teacher_source('cached', open_checked_cache(cfg, tasks)) to StudentModule"
            )
        self.reach = recorded_reach(self.cache.fingerprint, cfg.tasks)

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        if "teacher" not in batch:
            raise ValueError(
                "kd.mode=cached but the batch has no teacher outputs; set kd.cache_dir"
            )
        return batch["teacher"]


@register_teacher_source("online")
class OnlineTeacher(TeacherSource):
    """The frozen teachers (``kd.teacher`` or ``kd.teachers``) run on the student's own view;
    ``ensemble`` given (a ``TeacherEnsemble`` or any frozen module mapping images to teacher
    outputs): that one, else a ``TeacherEnsemble`` built from the run config at setup.
    ``ensemble`` is positional only: an object passed in code, not a ``kd.mode`` option."""

    def __init__(self, ensemble: nn.Module | None = None, /) -> None:
        self.ensemble = ensemble

    def setup(self, cfg: DictConfig) -> None:
        if self.ensemble is not None:
            return
        teachers = distill_teachers(cfg.kd)
        if not teachers:
            raise ValueError(
                "kd.mode=online needs kd.teacher=<path/to/teacher.ckpt> or a kd.teachers list"
            )
        tasks = to_container(cfg.tasks)
        self.ensemble = TeacherEnsemble(teachers, tasks, cfg.data)
        self.reach = self.ensemble.reach
        announce(self.ensemble.provenance(list(tasks)), self.ensemble.notes)

    def to(self, device: torch.device) -> None:
        if self.ensemble is not None:
            self.ensemble.to(device)

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.ensemble is None:
            raise ValueError("the online teacher is not set up; call setup(cfg) first")
        if self.reach:  # teachers limited to some data sources combine per image
            return self.ensemble(batch["image"], batch["source"])
        return self.ensemble(batch["image"])
