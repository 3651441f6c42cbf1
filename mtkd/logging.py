"""Loggers from the ``logger`` config group: W&B (online/offline) through Lightning's
WandbLogger, CSV, or none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from mtkd.config import to_container


def logger_callbacks(cfg: DictConfig, logger: Any) -> list[Callback]:
    """Callbacks that feed the logger (image panels, run-id in checkpoints); none yet."""
    return []


def make_logger(
    cfg: DictConfig, run_dir: Path, job_type: str, resume_from: str | None = None
) -> Any:
    """The configured Lightning logger; ``resume_from`` continues that checkpoint's W&B run."""
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="logs")
    offline = kind == "wandb_offline"
    if offline:
        rank_zero_info(
            f"W&B is offline: runs are written under {run_dir}/wandb; upload later with `wandb sync`."
        )
    logger = WandbLogger(
        project=cfg.logger.project,
        group=cfg.logger.group or job_type,
        name=cfg.logger.name,
        job_type=job_type,
        tags=list(cfg.logger.tags),
        save_dir=str(run_dir),
        offline=offline,
        log_model=not offline,
    )
    logger.log_hyperparams(to_container(cfg))
    return logger
