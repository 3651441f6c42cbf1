"""mtkd demo: the newcomer's whole path in one command, end to end at toy size."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import mtkd.commands.demo_runs
from mtkd.commands.demo import main
from mtkd.commands.demo_runs import (
    CLASSIFICATION_KD_ALPHA,
    RUN_DIRS,
    STUDENT_LABEL_FRACTION,
    run_demo,
)


@pytest.mark.unit
def test_demo_refuses_overrides_it_sets_per_stage() -> None:
    with pytest.raises(ValueError, match=r"demo sets \['kd', 'run.dir'\] itself.*runs=DIR"):
        run_demo(["run.dir=elsewhere", "kd=online", "trainer.max_epochs=1"])


@pytest.mark.unit
def test_demo_refuses_runs_it_did_not_write_and_fast_dev_run(tmp_path: Path) -> None:
    """runs/teacher may hold a `mtkd train-teacher` run (its default run.dir): not the demo's."""
    runs = tmp_path / "runs"
    ckpt = runs / "teacher" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"someone's teacher")
    with pytest.raises(ValueError) as refused:
        run_demo([], runs)
    assert str(refused.value) == (
        f"{runs / 'teacher'} hold runs that the demo did not write (no {runs / 'demo.json'}); "
        "give the demo a folder of its own with runs=DIR, or move them"
    )
    with pytest.raises(ValueError, match="demo: trainer.fast_dev_run writes no checkpoint"):
        run_demo(["trainer.fast_dev_run=true"], tmp_path / "fresh")
    assert not (runs / "demo.json").exists() and not (tmp_path / "fresh").exists()
    assert ckpt.read_bytes() == b"someone's teacher"


@pytest.mark.unit
def test_a_second_demo_replaces_the_runs_of_the_first_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mtkd")
    runs = tmp_path / "runs"
    for name in RUN_DIRS:
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"an earlier demo's")
    (runs / "demo.json").write_text("{}")
    trained = []

    def fake_fit(cfg):
        trained.append((cfg.run.dir, cfg.run.overwrite))
        return Path(cfg.run.dir) / "checkpoints" / "best.ckpt"

    monkeypatch.setattr(mtkd.commands.demo_runs, "fit", fake_fit)
    for name in ("cache_teacher", "evaluate", "build_report"):
        monkeypatch.setattr(mtkd.commands.demo_runs, name, lambda *args, **kwargs: None)
    run_demo(["trainer.max_epochs=1"], runs)
    assert trained == [(str(runs / name), True) for name in RUN_DIRS]
    held = ", ".join(str(runs / name) for name in RUN_DIRS)
    assert f"demo: replacing the runs an earlier demo left in {held}" in caplog.text
    assert json.loads((runs / "demo.json").read_text())["overrides"] == ["trainer.max_epochs=1"]


@pytest.mark.unit
def test_only_the_kd_student_trusts_the_teacher_more_on_its_classification_heads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = {}

    def fake_fit(cfg):
        configs[Path(cfg.run.dir).name] = cfg
        return Path(cfg.run.dir) / "checkpoints" / "best.ckpt"

    monkeypatch.setattr(mtkd.commands.demo_runs, "fit", fake_fit)
    for name in ("cache_teacher", "evaluate", "build_report"):
        monkeypatch.setattr(mtkd.commands.demo_runs, name, lambda *args, **kwargs: None)
    run_demo([], tmp_path / "runs")
    kd, twin = configs["student"].kd, configs["student_nokd"].kd
    assert {n: t.get("alpha") for n, t in kd.tasks.items()} == dict.fromkeys(
        ["dr_grade", "dme_risk", "glaucoma"], CLASSIFICATION_KD_ALPHA
    )
    assert kd.alpha == 0.5 and twin.mode == "none" and not twin.tasks


@pytest.mark.integration
def test_demo_trains_evaluates_and_reports_all_three_models(
    tiny, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mtkd")
    runs = tmp_path / "runs"
    overrides = [o for o in tiny() if not o.startswith(("run.dir=", "kd.cache_dir="))]
    main([f"runs={runs}", *overrides])
    printed = capsys.readouterr().out

    for step in ("1/6 train the teacher", "4/6 train the same student without KD", "6/6 write"):
        assert f"== demo: {step}" in caplog.text
    table = printed.split("| task | metric | teacher | student KD | student no KD |\n", 1)[1]
    rows = [line.split(" | ") for line in table.split("\n\n", 1)[0].splitlines()[1:]]
    tasks = ["dr_grade", "dme_risk", "glaucoma", "cdr", "lesions", "anatomy", "landmarks"]
    assert list(dict.fromkeys(r[0].removeprefix("| ") for r in rows)) == tasks
    # The printed numbers are each model's own test metrics.
    row = next(r for r in rows if r[0] == "| landmarks" and r[1] == "dist *")
    for run, cell in zip(("teacher", "student", "student_nokd"), row[2:]):
        metrics = json.loads((runs / run / "metrics_test.json").read_text())
        assert metrics["split"] == "test"
        assert cell.removesuffix(" |") == f"{metrics['metrics']['test/landmarks/dist']:.4f}"

    student_cfg = (runs / "student" / "checkpoints" / "config.yaml").read_text()
    baseline_cfg = (runs / "student_nokd" / "checkpoints" / "config.yaml").read_text()
    assert "mode: cached" in student_cfg and "mode: none" in baseline_cfg
    assert "max_epochs: 1" in student_cfg and "max_epochs: 1" in baseline_cfg  # same budget
    # Scarce labels for both students, every label for the teacher.
    scarce = f"label_fraction: {STUDENT_LABEL_FRACTION}"
    assert scarce in student_cfg and scarce in baseline_cfg
    teacher_cfg = (runs / "teacher" / "checkpoints" / "config.yaml").read_text()
    assert "label_fraction: 1.0" in teacher_cfg
    assert "KD vs no KD (95% paired intervals of each task's main metric): won " in printed
    assert (runs / "teacher_cache" / "fingerprint.json").is_file()
    assert json.loads((runs / "demo.json").read_text())["runs"] == list(RUN_DIRS)  # its own
    for name in ("report.md", "report.json", "metrics.png", "predictions.png"):
        assert (runs / "report" / name).is_file()
    assert "student no KD" in (runs / "report" / "report.md").read_text()
    assert f"report: {runs / 'report' / 'report.md'}" in printed
    assert "wall time per stage" in printed and "total" in printed
