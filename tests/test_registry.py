"""The one ``Registry`` behind every extension axis: its duplicate policy, the error that lists
the registered names, and config options checked against the registered object's signature."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from data_modules.registry import Registry, parse_choice
from data_modules.samples import SOURCES, read_source
from mtkd.config import ConfigError
from mtkd.kd.losses import kd_losses
from mtkd.kd.teacher_source import TEACHER_SOURCES
from mtkd.modules.optim import SCHEDULES
from mtkd.modules.weighting import WEIGHTINGS, DynamicWeightAveraging, build_weighting
from mtkd.run_config import load_config
from mtkd.tasks import Task, register_task
from mtkd.tasks.base import TASK_KINDS
from mtkd.tracking.loggers import LOGGERS

pytestmark = pytest.mark.unit


def registry(given: int = 0) -> Registry:
    return Registry("run.thing", "thing", "@register_thing(name)", given=given)


def first(total: int, warmup: int, shift: int = 0, /, factor: float = 1.0, *, scale: float):
    """An entry: two arguments from the library, one more positional-only, two options."""
    return (total, warmup, shift, factor, scale)


def second() -> None:
    """Another object, defined elsewhere."""


def reimported(fn: types.FunctionType) -> types.FunctionType:
    """A copy of ``fn`` as its module imported a second time defines it: a new object of the
    same module and name."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)
    copy.__qualname__ = fn.__qualname__
    return copy


def test_every_axis_is_one_registry_class():
    axes = [TASK_KINDS, kd_losses("classification"), WEIGHTINGS, TEACHER_SOURCES, SCHEDULES]
    assert all(type(axis) is Registry for axis in [*axes, LOGGERS, SOURCES])


def test_the_same_object_or_its_reimport_may_register_again_another_is_refused():
    things = registry()
    assert things.register("a", first) is first
    things.register("a", first)  # the same object: nothing happens
    again = reimported(first)
    assert again is not first
    things.register("a", again)  # its module imported again: the live object replaces it
    assert things.get("a") is again
    with pytest.raises(ValueError, match=r"thing 'a' is already registered by .*test_registry\."):
        things.register("a", second)
    assert things.get("a") is again and things.names() == ["a"]


def test_a_library_axis_refuses_a_taken_name_naming_the_module_that_took_it():
    class Impostor(Task):
        pass

    taken = r"task kind 'classification' is already registered by mtkd.tasks.classification\."
    with pytest.raises(ValueError, match=taken):
        register_task("classification")(Impostor)
    assert TASK_KINDS.get("classification").__name__ == "ClassificationTask"


def test_decorator_form_returns_the_object_and_unregister_removes_it():
    things = registry()
    assert things.register("b")(second) is second
    assert "b" in things
    things.unregister("b")
    assert "b" not in things and things.names() == []


def test_unknown_name_lists_the_names_the_axis_and_how_to_register_one():
    things = registry()
    things.register("zeta", first)
    things.register("alpha", second)
    expected = (
        "run.thing='beta' is unknown; choose one of: alpha, zeta (or register another thing "
        "with @register_thing(name) in a plugin module)"
    )
    with pytest.raises(ValueError) as error:
        things.get("beta")
    assert str(error.value) == expected
    with pytest.raises(ValueError, match=r"^tasks.x.kind='beta' is unknown; choose one of: alpha"):
        things.get("beta", key="tasks.x.kind")
    with pytest.raises(ValueError, match=r"choose one of: \(none registered\)"):
        registry().get("beta")


def test_a_choice_is_a_name_or_a_name_with_options():
    assert parse_choice("k", "dwa") == ("dwa", {})
    assert parse_choice("k", {"name": "dwa", "temperature": 4}) == ("dwa", {"temperature": 4})
    for bad in (3, {"temperature": 4}, {"name": 1}):
        with pytest.raises(ValueError, match=r"^k=.*: give a name or \{name: <name>"):
            parse_choice("k", bad)


def test_options_are_the_keyword_parameters_after_the_given_ones():
    things = registry(given=2)
    things.register("first", first)
    assert things.create({"name": "first", "scale": 3.0}, 10, 1) == (10, 1, 0, 1.0, 3.0)
    assert things.create({"name": "first", "scale": 3.0, "factor": 2.0}, 10, 1)[3] == 2.0
    # the library's own arguments and a positional-only parameter are no options
    for option in ("total", "shift", "sacle"):
        with pytest.raises(ValueError, match=rf"^run.thing='first': unknown options \['{option}'"):
            things.resolve({"name": "first", "scale": 1.0, option: 1})
    with pytest.raises(
        ValueError, match=r"missing options \['scale'\]; valid options: factor, scale$"
    ):
        things.resolve("first")
    with pytest.raises(ValueError, match=r"unknown options \['x'\] and missing options"):
        things.resolve({"name": "first", "x": 1})


def test_an_entry_taking_any_keyword_takes_any_option():
    things = registry(given=1)
    things.register("open", lambda root, **options: options)
    assert things.create({"name": "open", "anything": 1}, "root") == {"anything": 1}
    things.register("closed", lambda root: root)
    with pytest.raises(ValueError, match=r"valid options: \(none: give the name alone\)"):
        things.resolve({"name": "closed", "anything": 1})


def test_config_options_reach_the_strategy_and_bad_ones_list_the_valid_ones():
    cfg = load_config("teacher", ["run.weighting={name: dwa, temperature: 4}"])
    strategy = build_weighting(cfg.run.weighting, {"a": 1.0})
    assert isinstance(strategy, DynamicWeightAveraging) and strategy.temperature == 4.0
    assert build_weighting(load_config("teacher").run.weighting, {"a": 1.0}).name == "fixed"
    assert build_weighting("dwa", {"a": 1.0}).temperature == 2.0  # the plain name: defaults
    bad = {
        "run.weighting={name: dwa, temp: 4}": r"run.weighting='dwa': unknown options \['temp'\]; "
        "valid options: temperature$",
        "optim.scheduler={name: cosine, warmup: 3}": r"unknown options \['warmup'\]; valid "
        r"options: \(none",
        # other tests' example loggers may be registered too: only the built-ins are sure
        "logger.kind={name: nope}": r"logger.kind='nope' is unknown; choose one of: csv, (.+, )?none",
        "kd.mode={mode: online}": r"kd.mode=\{'mode': 'online'\}: give a name or",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config("teacher", [override])
    assert load_config("teacher", ["logger.kind={name: csv}"]).logger.kind.name == "csv"


def test_data_source_options_are_checked_against_the_reader(tmp_path: Path):
    with pytest.raises(
        ValueError, match=r"'folder': unknown options \['nam'\]; valid options: name"
    ):
        read_source("folder", tmp_path, {"nam": "clinic"})
