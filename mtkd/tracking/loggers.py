"""Loggers from the ``logger`` config group, a registry (``logger.kind``, a name or
``{name: ..., **options}``): CSV or none here, W&B (online/offline) in wandb_logger
(``@register_logger`` adds one, with the callbacks that feed it if it needs any)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from data_modules.registry import Registry, parse_choice

#: (config, run folder, job type, checkpoint whose W&B run to continue, **options) -> Lightning
#: logger (or False for none)
LoggerFactory = Callable[..., Any]

#: ``logger.kind`` -> factory, called with those four arguments and the choice's options
LOGGERS: Registry[LoggerFactory] = Registry(
    "logger.kind", "logger", "@register_logger(name)", given=4
)


#: (config, the logger its factory built) -> the callbacks that feed that logger
CallbackFactory = Callable[[DictConfig, Any], list[Callback]]

#: ``logger.kind`` -> its callbacks, for the kinds registered with some
LOGGER_CALLBACKS: dict[str, CallbackFactory] = {}


def register_logger(
    name: str, callbacks: CallbackFactory | None = None
) -> Callable[[LoggerFactory], LoggerFactory]:
    """Function decorator: ``logger.kind=name`` builds the run's logger with this factory; its
    keyword parameters after the four above are its options
    (``logger.kind={name: ..., option: value}``). ``callbacks``: what the stages add to the
    Trainer for that logger (W&B's run record and image panels)."""
    if callbacks is not None:
        LOGGER_CALLBACKS[name] = callbacks
    return LOGGERS.register(name)


def make_logger(
    cfg: DictConfig, run_dir: Path, job_type: str, resume_from: str | None = None
) -> Any:
    """The configured Lightning logger; ``resume_from`` continues that checkpoint's W&B run."""
    return LOGGERS.create(cfg.logger.kind, cfg, Path(run_dir), job_type, resume_from)


def logger_callbacks(cfg: DictConfig, logger: Any) -> list[Callback]:
    """The callbacks the configured logger kind was registered with; none without a logger."""
    callbacks = LOGGER_CALLBACKS.get(parse_choice("logger.kind", cfg.logger.kind)[0])
    return callbacks(cfg, logger) if logger and callbacks else []


@register_logger("none")
def no_logger(cfg: DictConfig, run_dir: Path, job_type: str, resume_from: str | None) -> bool:
    return False


@register_logger("csv")
def csv_logger(cfg: DictConfig, run_dir: Path, job_type: str, resume_from: str | None) -> CSVLogger:
    return CSVLogger(save_dir=str(run_dir), name="logs")
