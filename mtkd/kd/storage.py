"""How teacher outputs are stored in the cache (``cache.*``), as the task kinds see it: each
kind encodes its cached array by a ``CacheStorage``. It sits below the rest of ``mtkd.kd`` (the
task kinds import it); ``cache_storage`` is the one way to build it from a run's config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from omegaconf import DictConfig

from mtkd.config import CacheConfig


@dataclass(frozen=True)
class CacheStorage:
    """How teacher outputs are stored: dense maps at ``dense_size`` pixels a side (or a task's
    own size in ``task_dense_size``) in ``dense_dtype`` (uint8-quantised probabilities, float16
    or float32), logits in ``logits_dtype``; the dtypes default to ``CacheConfig``'s."""

    dense_size: int
    dense_dtype: str = CacheConfig.dense_dtype
    logits_dtype: str = CacheConfig.logits_dtype
    task_dense_size: dict[str, int] = field(default_factory=dict)

    def for_task(self, name: str) -> CacheStorage:
        """The storage of one task's array: its own dense size where it has one."""
        size = self.task_dense_size.get(name, self.dense_size)
        return dataclasses.replace(self, dense_size=size, task_dense_size={})


def cache_storage(cfg: DictConfig) -> CacheStorage:
    """How cache-teacher stores this run's teacher outputs: dense maps at ``cache.dense_size``
    (null: the working size) unless ``cache.task_dense_size`` gives a task its own."""
    return CacheStorage(
        int(cfg.cache.dense_size or cfg.data.image_size),
        cfg.cache.dense_dtype,
        cfg.cache.logits_dtype,
        {n: int(s) for n, s in cfg.cache.task_dense_size.items()},
    )
