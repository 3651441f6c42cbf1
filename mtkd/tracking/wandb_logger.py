"""W&B, every line of it: the ``wandb`` and ``wandb_offline`` loggers (Lightning's WandbLogger,
offline when asked or when W&B is unreachable), the callbacks that keep a W&B run useful to
researchers (run id in checkpoints, final summary, teacher vs student table, image panels from
wandb_panels) and the study's summary run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from data_modules.registry import parse_choice
from mtkd.config import to_container
from mtkd.modules.checkpoint import read_checkpoint
from mtkd.status import status_logger
from mtkd.tracking.loggers import register_logger

log = status_logger(__name__)

#: checkpoint key holding the W&B run id, so ``run.resume=<ckpt>`` continues that run
RUN_ID_KEY = "wandb_run_id"


def wandb_callbacks(cfg: DictConfig, logger: WandbLogger) -> list[Callback]:
    """Callbacks that feed a W&B logger: run id in checkpoints, final summary, image panels."""
    callbacks: list[Callback] = [WandbRunRecord(cfg, logger)]
    if cfg.logger.log_images:
        from mtkd.tracking.wandb_panels import ValidationPanels

        callbacks.append(ValidationPanels(cfg, logger))
    return callbacks


@register_logger("wandb", callbacks=wandb_callbacks)
@register_logger("wandb_offline", callbacks=wandb_callbacks)
def wandb_logger(
    cfg: DictConfig, run_dir: Path, job_type: str, resume_from: str | None
) -> WandbLogger:
    """W&B through Lightning's WandbLogger; offline when asked or when W&B is unreachable."""
    import wandb

    if wandb.run is not None:
        # Left open by an earlier stage in this process (e.g. `mtkd demo`): one run per stage.
        wandb.finish()
    offline_reason = wandb_offline_reason(parse_choice("logger.kind", cfg.logger.kind)[0])
    logger = WandbLogger(
        project=cfg.logger.project,
        group=cfg.logger.group or run_dir.resolve().parent.name,
        name=cfg.logger.name or run_dir.name,
        job_type=job_type,
        tags=list(cfg.logger.tags),
        save_dir=str(run_dir),
        offline=offline_reason is not None,
        log_model=offline_reason is None,
        id=read_checkpoint(resume_from).get(RUN_ID_KEY) if resume_from else None,
        config=to_container(cfg),
    )
    if rank_zero_only.rank == 0:
        run = logger.experiment  # created now, on rank 0 only, so the message can name it
        if offline_reason is None:
            log.info(f"W&B run {run.id}: {run.url}")
        else:
            files = Path(run.dir).parent
            log.info(
                f"W&B is offline ({offline_reason}): run {run.id} is written to {files}. "
                f"Upload it later with `wandb sync {files.parent}/offline-run-*-{run.id}`."
            )
    return logger


def wandb_offline_reason(kind: str) -> str | None:
    """Why a W&B run must be written offline, or None when it can go online: ``wandb`` falls
    back to offline without credentials or without a route to the W&B server."""
    import wandb

    if kind == "wandb_offline":
        return "logger=wandb_offline"
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "dryrun"):
        return f"WANDB_MODE={mode}"
    if not wandb.login(prompt=False, verify=False):
        return "no W&B credentials: run `wandb login` or set WANDB_API_KEY"
    url = urlparse(wandb.setup().settings.base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
    except OSError as exc:
        return f"cannot reach {url.geturl()} ({exc})"
    return None


def teacher_metrics_file(cfg: DictConfig) -> Path:
    """The teacher run's ``metrics_val.json``: the run dir is two levels above its checkpoint."""
    teacher = cfg.kd.teacher or cfg.cache.teacher[0]
    return Path(teacher).parent.parent / "metrics_val.json"


def teacher_student_rows(teacher: dict[str, float], student: dict[str, float]) -> list[list[Any]]:
    """One row per validation metric: name, teacher, student, student - teacher (None if absent)."""
    rows = []
    for key in sorted(k for k in set(teacher) | set(student) if k.startswith("val/")):
        t, s = teacher.get(key), student.get(key)
        rows.append([key, t, s, None if t is None or s is None else s - t])
    return rows


class WandbRunRecord(Callback):
    """Keeps a stage's W&B run whole: stores its id in every checkpoint (so ``run.resume``
    continues it) and, after the final validation of the best checkpoint, writes the summary
    score and, for distill, a teacher vs student table. Rank 0 only."""

    def __init__(self, cfg: DictConfig, logger: WandbLogger) -> None:
        self.cfg = cfg
        self.logger = logger

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.is_global_zero:
            checkpoint[RUN_ID_KEY] = self.logger.version

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.state.fn != TrainerFn.VALIDATING:
            return  # validation inside fit is only an epoch; the final one comes after
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.monitor in metrics:
            self.logger.experiment.summary.update(
                {
                    "summary/metric": checkpoint.monitor,
                    "summary/score": metrics[checkpoint.monitor],
                    "summary/checkpoint": checkpoint.best_model_path,
                }
            )
        if self.cfg.stage == "distill":
            self.log_teacher_comparison(metrics, trainer.global_step)

    def log_teacher_comparison(self, student: dict[str, float], step: int) -> None:
        path = teacher_metrics_file(self.cfg)
        if not path.is_file():
            log.warning(f"no teacher vs student table: {path} does not exist")
            return
        teacher = json.loads(path.read_text())["metrics"]
        self.logger.log_table(
            "val/teacher_vs_student",
            columns=["metric", "teacher", "student", "student - teacher"],
            data=teacher_student_rows(teacher, student),
            step=step,
        )


def log_study_summary(logger: Any, header: list, rows: list, png: Path) -> None:
    """The study's table and plot as one W&B run, when ``logger`` (the configured one, built
    with job type study) is W&B; other loggers get nothing."""
    if isinstance(logger, WandbLogger):
        logger.log_table("study/results", columns=header, data=rows)
        logger.log_image("study/plot", images=[str(png)])
        logger.experiment.finish()
