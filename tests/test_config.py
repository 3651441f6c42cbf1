"""Configuration composition and the errors a user sees for bad input."""

from __future__ import annotations

import importlib
import re

import pytest

from mtkd.config import ConfigError
from mtkd.run_config import apply_overrides, load_config

pytestmark = pytest.mark.unit


def test_defaults_compose_groups():
    cfg = load_config("teacher")
    assert cfg.model.encoder == "resnet18"
    assert cfg.data.sources.synthetic.kind == "synthetic"
    assert cfg.trainer.accelerator == "cpu"
    assert set(cfg.tasks) >= {"dr_grade", "lesions", "landmarks", "cdr"}
    assert load_config("distill").model.encoder == "tu-mobilenetv3_small_100"


def test_group_swap_and_value_overrides():
    cfg = load_config("distill", ["kd=online", "trainer.max_epochs=3", "data.image_size=64"])
    assert cfg.kd.mode == "online"
    assert cfg.trainer.max_epochs == 3 and cfg.data.image_size == 64


def test_removals_and_values_apply_in_the_order_given():
    replaced = load_config("teacher", ["~tasks.cdr", "tasks.cdr={kind: regression, weight: 2}"])
    assert replaced.tasks.cdr.kind == "regression" and replaced.tasks.cdr.weight == 2
    removed = load_config("teacher", ["tasks.cdr.weight=3", "~tasks.cdr"])
    assert "cdr" not in removed.tasks
    again = load_config("teacher", ["~tasks.cdr", "tasks.cdr={kind: regression}", "~tasks.cdr"])
    assert "cdr" not in again.tasks


def test_a_value_that_is_not_yaml_is_named_with_the_fix():
    """``{a:{b:1}}`` (no space after the colons) used to end in "unexpected ScannerError"."""
    bad = "kd.tasks={dr_grade:{temperature:1}}"
    for run in (
        lambda: load_config("distill", ["run.seed=1", bad]),
        lambda: apply_overrides(load_config("distill"), [bad]),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"{bad}: the value is not valid YAML")):
            run()
    fixed = load_config("distill", ["kd.tasks={dr_grade: {temperature: 1}}"])
    assert fixed.kd.tasks.dr_grade.temperature == 1


def test_gpu_profile_sets_full_size():
    cfg = load_config("teacher", ["profile=gpu"])
    assert cfg.data.image_size == 512 and cfg.trainer.accelerator == "gpu"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.encodr=resnet18", "valid keys under model: .*encoder"),
        ("data.sources.synthetic.sise=64", "valid keys under data.sources.synthetic: kind, "),
        ("data.image_size=large", "data.image_size"),
        ("trainer.max_epoch=2", "valid Lightning Trainer flags: .*max_epochs"),
        ("kd.mode=sideways", "kd.mode='sideways' is unknown; choose one of: cached, none"),
        ("tasks.dr_grade.colour=1", "valid keys"),
        ("data=nope", "choose one of"),
        ("kd.tasks.nope.alpha=1", "unknown tasks"),
        ("noequals", "must look like key=value"),
    ],
)
def test_bad_overrides_fail_with_valid_options(override, message):
    with pytest.raises(
        ConfigError if "tasks.dr" not in override else ValueError, match=message
    ) as info:
        load_config("teacher", [override])
    assert "\n" not in str(info.value)  # one line: the problem and the valid choices


def test_apply_overrides_validates_saved_config():
    cfg = load_config("teacher")
    assert apply_overrides(cfg, ["data.batch_size=4"]).data.batch_size == 4
    with pytest.raises(ConfigError):
        apply_overrides(cfg, ["data.bogus=1"])


@pytest.mark.parametrize(
    ("override", "registry"),
    [
        ("kd.mode=sideways", "mtkd.kd.teacher_source:TEACHER_SOURCES"),
        ("run.weighting=sideways", "mtkd.modules.weighting:WEIGHTINGS"),
        ("logger.kind=sideways", "mtkd.tracking.loggers:LOGGERS"),
        ("optim.scheduler=sideways", "mtkd.modules.optim:SCHEDULES"),
    ],
)
def test_choices_of_a_swappable_part_come_from_its_registry(override, registry):
    module, _, name = registry.partition(":")
    parts = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError, match=re.escape(f"choose one of: {', '.join(parts.names())}")):
        load_config("teacher", [override])
    parts.register("sideways", parts.get(parts.names()[0]))  # a plugin registers one
    try:
        section, field = override.split("=")[0].split(".")
        assert load_config("teacher", [override])[section][field] == "sideways"
    finally:
        parts.unregister("sideways")


def test_optimiser_names_are_timms():
    with pytest.raises(
        ConfigError, match=r"optim.name='sideways' is not one of \[.*'adamw'.*'sgd'"
    ):
        load_config("teacher", ["optim.name=sideways"])
    assert load_config("teacher", ["optim.name=lamb"]).optim.name == "lamb"
