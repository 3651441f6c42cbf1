"""What ``fit`` does with its run directory: a folder holding a finished or an interrupted run
is refused unless run.resume or run.overwrite says what to do with it; nothing is written into
it before the data checks pass; a fresh run does not warn that its checkpoint folder is not
empty and, without a progress bar, says one line per epoch; trainer.fast_dev_run ends well and
writes nothing."""

from __future__ import annotations

import csv
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import yaml

from mtkd.config import ConfigError
from mtkd.run_config import load_config
from mtkd.stages import fit
from tests.conftest import tiny_overrides


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def fake_run(run_dir: Path, *checkpoints: str, finished: bool) -> dict[str, bytes]:
    """A run folder as a finished or an interrupted run leaves it; returns its snapshot."""
    for name in checkpoints:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / name).write_bytes(f"weights of {name}".encode())
    (run_dir / "checkpoints" / "config.yaml").write_text("stage: teacher\n")
    if finished:
        (run_dir / "metrics_val.json").write_text('{"metrics": {}}')
    return snapshot(run_dir)


@pytest.mark.unit
@pytest.mark.parametrize(
    "checkpoints, finished, held",
    [
        (
            ("best.ckpt", "last.ckpt"),
            True,
            "a finished run: checkpoints/best.ckpt, checkpoints/last",
        ),
        (("last.ckpt",), False, "an unfinished run (no metrics_val.json): checkpoints/last.ckpt"),
    ],
)
def test_a_run_dir_holding_checkpoints_is_refused_naming_it_and_both_keys(
    tmp_path: Path, checkpoints: tuple[str, ...], finished: bool, held: str
) -> None:
    run_dir = tmp_path / "run"
    before = fake_run(run_dir, *checkpoints, finished=finished)
    # No data set at all: the refusal comes before anything is read.
    cfg = load_config("teacher", tiny_overrides(tmp_path / "no_data", run_dir))
    with pytest.raises(ConfigError) as refused:
        fit(cfg)
    message = str(refused.value)
    assert message.startswith(f"{run_dir} holds {held}")
    assert f"run.resume={run_dir / 'checkpoints' / 'last.ckpt'}" in message
    assert "run.overwrite=true" in message and "another run.dir" in message
    assert snapshot(run_dir) == before


@pytest.mark.integration
def test_a_rerun_refused_by_its_data_writes_nothing_into_the_run_dir(synth_root, tmp_path):
    """The label check fails inside the data module's setup: the config, the logger's folder
    and the checkpoint folder used to be written before it."""
    run_dir = tmp_path / "run"
    bad = {"logger": "csv", "tasks.cdr.labels": "[nope]", "data.preprocess.cache_dir": tmp_path}
    bad = tiny_overrides(synth_root, run_dir, **bad)
    with pytest.raises(ValueError, match="task 'cdr': no sample"):
        fit(load_config("teacher", bad))
    assert list(run_dir.iterdir()) == []


@pytest.mark.integration
def test_run_overwrite_replaces_a_finished_run_only_once_the_data_checks_pass(synth_root, tmp_path):
    run_dir = tmp_path / "run"
    before = fake_run(run_dir, "best.ckpt", "last.ckpt", finished=True)
    over = tiny_overrides(synth_root, run_dir, **{"logger": "csv", "run.overwrite": "true"})
    with pytest.raises(ValueError, match="task 'cdr': no sample"):
        fit(load_config("teacher", [*over, "tasks.cdr.labels=[nope]"]))
    assert snapshot(run_dir) == before  # config.yaml included

    best = fit(load_config("teacher", over))
    assert best == run_dir / "checkpoints" / "best.ckpt"
    assert best.read_bytes() != before["checkpoints/best.ckpt"]
    assert yaml.safe_load((best.parent / "config.yaml").read_text())["run"]["overwrite"] is True
    assert json.loads((run_dir / "metrics_val.json").read_text())["checkpoint"] == str(best)


@pytest.mark.integration
def test_a_fresh_run_says_each_epoch_without_warning_and_a_rerun_is_refused(
    synth_root, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="mtkd")
    run_dir = tmp_path / "run"
    over = tiny_overrides(
        synth_root, run_dir, **{"logger": "csv", "trainer.max_epochs": 2, "tasks.cdr.weight": 2}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = fit(load_config("teacher", over))
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    saved = yaml.safe_load((best.parent / "config.yaml").read_text())
    assert saved["stage"] == "teacher" and saved["tasks"]["cdr"]["weight"] == 2

    # One line per epoch (the progress bar is off), with the numbers the logger recorded.
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2
    for epoch, line in enumerate(lines):
        found = re.fullmatch(
            rf"epoch {epoch + 1}/2: train/loss (\S+), val/score (\S+), \S+ s", line
        )
        assert found, line
        logged = [r for r in rows if r["epoch"] == str(epoch)]
        train = next(float(r["train/loss_epoch"]) for r in logged if r["train/loss_epoch"])
        val = next(float(r["val/score"]) for r in logged if r["val/score"])
        assert float(found[1]) == pytest.approx(train, abs=1e-4)
        assert float(found[2]) == pytest.approx(val, abs=1e-4)

    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"holds a finished run: checkpoints/best.ckpt"):
        fit(load_config("teacher", over))
    assert snapshot(run_dir) == before


@pytest.mark.integration
def test_fast_dev_run_ends_with_its_validation_and_writes_nothing(
    synth_root, tmp_path, capsys, caplog
):
    caplog.set_level(logging.INFO, logger="mtkd")
    run_dir = tmp_path / "run"
    smoke = {"trainer.fast_dev_run": "true", "trainer.enable_progress_bar": "true", "logger": "csv"}
    over = tiny_overrides(synth_root, run_dir, **smoke, **{"data.preprocess.cache_dir": tmp_path})
    assert fit(load_config("teacher", over)) is None
    printed = capsys.readouterr().out
    assert "teacher validation (trainer.fast_dev_run: the model as trained" in printed
    assert "dr_grade" in printed and "kappa=" in printed
    assert list(run_dir.iterdir()) == []  # no checkpoint, config, log or split file
    # the progress bar is on: no epoch lines
    assert not [r for r in caplog.records if r.getMessage().startswith("epoch ")]
