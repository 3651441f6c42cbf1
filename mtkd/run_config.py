"""A stage's config: composed by ``mtkd.config`` (schema, YAML groups, experiment recipes,
overrides and the checks the config alone can answer), then filled in and checked with what the
layers above the config know: an unset ``data.mean``/``data.std`` from the encoder's pretraining,
the Trainer flags against Lightning's ``Trainer``, the task specs by building the tasks once, and
each swappable part's choice against its registry (so a plugin's registration is a valid choice).

Every command that runs a stage reads its config here: ``load_config`` for a new run,
``apply_overrides`` for one saved in a checkpoint.
"""

from __future__ import annotations

import inspect

from lightning.pytorch import Trainer
from omegaconf import DictConfig, OmegaConf

from data_modules.datamodule import SampleList
from mtkd.config import (
    ConfigError,
    check_choices,
    compose,
    import_plugins,
    recompose,
    to_container,
)
from mtkd.derived import parse_derived
from mtkd.kd.teacher_source import TEACHER_SOURCES
from mtkd.models.pretrained import pretrained_normalisation
from mtkd.modules.optim import SCHEDULES, optimizer_names
from mtkd.modules.weighting import WEIGHTINGS
from mtkd.tasks import build_tasks
from mtkd.tracking.loggers import LOGGERS


def load_config(stage: str, overrides: list[str] | None = None) -> DictConfig:
    """The config of a new ``stage`` run (``mtkd.config.compose``: ``<stage>.yaml`` + groups + an
    ``experiment=`` recipe + overrides), its normalisation resolved, validated."""
    cfg = compose(stage, overrides)
    resolve_normalisation(cfg)
    validate(cfg)
    learn_task_specs(cfg)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """A saved config (e.g. a checkpoint's) with ``overrides`` applied (``mtkd.config.recompose``:
    ``a.b=value``, ``trainer=`` and ``logger=``), validated."""
    merged = recompose(cfg, overrides)
    validate(merged)
    return merged


def resolve_normalisation(cfg: DictConfig) -> None:
    """Fill an unset ``data.mean``/``data.std`` from the encoder's pretraining (timm's
    ``pretrained_cfg``; ImageNet statistics for random or local weights). The resolved values are
    saved with the config, so every later command on the checkpoint uses them."""
    if cfg.data.mean is None or cfg.data.std is None:
        mean, std = pretrained_normalisation(cfg.model.encoder, cfg.model.encoder_weights)
        if cfg.data.mean is None:
            cfg.data.mean = list(mean)
        if cfg.data.std is None:
            cfg.data.std = list(std)


def learn_task_specs(cfg: DictConfig) -> None:
    """Fill in what a task's spec leaves to the training data (``Task.learned_spec``: a text
    task's vocabulary), so every stage of one data set agrees on it, the checkpoint saves it and
    a teacher cache written for another is refused. The data is read only when a task asks, and
    without ``data.label_fraction``: a student that sees a fraction of the labels must share the
    vocabulary of the teacher that saw them all, or the teacher's cache would be refused."""
    tasks = build_tasks(to_container(cfg.tasks))
    learning = {n: t for n, t in tasks.items() if t.learns_from_data}
    if not learning:
        return
    every_label = OmegaConf.merge(cfg.data, {"label_fraction": 1.0})
    train = [s for s in SampleList(every_label).prepared() if s.split == "train"]
    for name, task in learning.items():
        cfg.tasks[name] = {**to_container(cfg.tasks[name]), **task.learned_spec(train)}


def validate(cfg: DictConfig) -> None:
    """The checks that need more than the config (``mtkd.config.check`` ran when it was
    composed): ``plugins`` imported first, so that their registrations count; Trainer flags;
    task specs; the derived measures against the tasks; each choice of a swappable part, name and options, against its registry; the
    optimiser's name against timm's."""
    import_plugins(list(cfg.plugins))
    trainer_args = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg.trainer) - trainer_args)
    if unknown:
        raise ConfigError(
            f"unknown trainer keys {unknown}; valid Lightning Trainer flags: {', '.join(sorted(trainer_args))}"
        )
    tasks = build_tasks(to_container(cfg.tasks), to_container(cfg.kd.tasks))
    parse_derived(to_container(cfg.derived), tasks)
    parts = [
        (TEACHER_SOURCES, cfg.kd.mode),
        (WEIGHTINGS, cfg.run.weighting),
        (LOGGERS, cfg.logger.kind),
        (SCHEDULES, cfg.optim.scheduler),
    ]
    for registry, choice in parts:
        try:
            registry.resolve(choice)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    check_choices({"optim.name": (cfg.optim.name, optimizer_names())})
