"""A logger defined outside the library: every logged step as one JSON line, for a shell
pipeline or a notebook without W&B. Import it through ``plugins=[logger]`` (this folder on
PYTHONPATH) and pick it with ``logger.kind=jsonl`` or with its option:
``"logger.kind={name: jsonl, file: log.jsonl}"`` (a path under the run folder).
tests/test_logger_plugin.py trains with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from mtkd.tracking.loggers import register_logger


class JsonLines(Logger):
    """Appends ``{"job": ..., "step": ..., "<metric>": value, ...}`` to ``path`` per logged step."""

    def __init__(self, path: Path, job: str) -> None:
        super().__init__()
        self.path = path
        self.job = job

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """Nothing to write: the run's config is saved beside its checkpoints."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps({"job": self.job, "step": step, **metrics}) + "\n")


@register_logger("jsonl")
def jsonl(
    cfg: DictConfig,
    run_dir: Path,
    job_type: str,
    resume_from: str | None,
    file: str = "metrics.jsonl",
) -> JsonLines:
    """The library passes the first four arguments; ``file`` is this logger's option."""
    return JsonLines(run_dir / file, job_type)
