"""The logger example of docs/extending.md, a file outside the library
(``examples/extending/logger.py``), records a training run picked with its option through the
config alone; the run's rates come from the schedule example (``examples/extending/schedule.py``)
picked the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtkd.run_config import load_config
from mtkd.stages import fit
from tests.conftest import REPO

pytestmark = pytest.mark.integration

EXAMPLES = REPO / "examples" / "extending"


def test_plugin_logger_records_the_run_and_the_plugin_schedules_rates(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    overrides = tiny(
        **{
            "plugins": "[logger, schedule]",
            "logger": "none",
            "logger.kind": "{name: jsonl, file: log/run.jsonl}",
            "optim.scheduler": "{name: step, milestones: [0.5], gamma: 0.1}",
            "trainer.max_epochs": 2,
        }
    )
    fit(load_config("teacher", overrides))
    lines = [json.loads(line) for line in (tmp_path / "log" / "run.jsonl").read_text().splitlines()]
    assert {line["job"] for line in lines} == {"teacher"}
    assert any("val/loss" in line for line in lines)
    # LearningRateMonitor logs each group's rate per epoch: the milestone falls between epochs
    epochs = [{k: v for k, v in line.items() if k.startswith("lr-")} for line in lines]
    first, second = [rates for rates in epochs if rates][:2]
    assert first.keys() == second.keys() and first
    assert all(second[k] == pytest.approx(0.1 * first[k]) for k in first)
