"""mtkd report and the profiling helpers: the tables carry every task and model, the ratios
follow from the networks' parameter counts, MACs are counted right, missing inputs are explained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mtkd.commands.report import main
from mtkd.commands.reporting import (
    ROLES,
    build_report,
    efficiency_table,
    kd_verdict,
    load_result,
    ratios,
    verdict_line,
)
from mtkd.markdown import markdown_table
from mtkd.models.multitask import count_parameters
from mtkd.modules.checkpoint import load_net
from mtkd.profiling import Profile, count_macs, profile_net
from mtkd.tasks import build_tasks
from tests.conftest import PNG_MAGIC, TinyRuns


@pytest.mark.unit
def test_macs_of_a_conv_and_a_linear_layer_are_counted_exactly() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    conv = 8 * 3 * 3 * 3 * 16 * 16  # out channels x in channels x kernel x output pixels
    linear = 8 * 16 * 16 * 10
    assert count_macs(net, 16) == conv + linear
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        profile = profile_net(net, 16, repeats=2, warmup=1)
        assert torch.get_num_threads() == 2  # restored after the one-thread latency
    finally:
        torch.set_num_threads(threads)
    assert profile.parameters == count_parameters(net) == (8 * 27 + 8) + (2048 * 10 + 10)
    assert profile.latency_ms > 0 and profile.latency_one_thread_ms > 0 and profile.throughput > 0
    assert profile.threads == 2


@pytest.mark.unit
def test_ratios_and_markdown_table() -> None:
    teacher = Profile(1000, 500, 20.0, 12.0, 50.0, 64, 2)
    student = Profile(250, 50, 5.0, 4.0, 400.0, 64, 2)
    assert ratios(teacher, student) == {
        "compression": 4.0,
        "macs": 10.0,
        "latency_speedup": 4.0,
        "latency_one_thread_speedup": 3.0,
        "throughput_speedup": 8.0,
    }
    table = efficiency_table(teacher, student)
    assert "| CPU latency, batch 1, 2 thread(s) (ms) | 20.0 | 5.0 | 4.00x |" in table
    assert "| CPU latency, batch 1, 1 thread (ms) | 12.0 | 4.0 | 3.00x |" in table
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |"
    numbers = markdown_table(["run", "s"], [["a", 1.5]], right={1})  # cells written with str
    assert numbers == "| run | s |\n| --- | ---: |\n| a | 1.5 |"


@pytest.mark.unit
def test_the_verdict_follows_each_main_metrics_direction_and_interval() -> None:
    tasks = build_tasks(
        {
            "grade": {"kind": "classification", "num_classes": 3},  # kappa: higher is better
            "ratio": {"kind": "regression"},  # mae: lower is better
            "spots": {"kind": "segmentation", "classes": ["a"]},  # dice: higher is better
            "points": {"kind": "localization", "points": ["p"]},  # dist: lower is better
            "other": {"kind": "classification", "num_classes": 2},  # not compared: left out
        }
    )
    paired = {
        "grade/kappa": {"lo": 0.02, "hi": 0.30},  # KD higher: won
        "ratio/mae": {"lo": 0.01, "hi": 0.05},  # KD's error higher: lost
        "spots/dice": {"lo": -0.01, "hi": 0.04},  # spans 0: tied
        "points/dist": {"lo": -0.3, "hi": -0.1},  # KD's distance lower: won
        "grade/acc": {"lo": -0.5, "hi": -0.4},  # not the main metric: ignored
    }
    verdict = kd_verdict(tasks, paired)
    assert verdict == {"won": ["grade", "points"], "lost": ["ratio"], "tied": ["spots"]}
    assert verdict_line(verdict).endswith(
        "won 2 of 4 (grade, points); lost 1 of 4 (ratio); tied 1 of 4 (spots)"
    )


@pytest.mark.unit
def test_missing_metrics_file_names_the_evaluate_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mtkd evaluate ckpt=.*best.ckpt split=test"):
        load_result("student", tmp_path)
    with pytest.raises(ValueError, match="unknown arguments"):
        main(["teacher=a", "epochs=3"])


@pytest.mark.integration
def test_report_compares_three_models_with_ratios_from_param_counts(
    runs: TinyRuns, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    # The student's run doubles as the baseline: three columns without a third training.
    report = build_report(
        {"teacher": runs.teacher_dir, "student": runs.student_dir, "baseline": runs.student_dir},
        out,
        n_images=2,
        repeats=2,
    )
    for name in ("report.md", "report.json", "metrics.png", "predictions.png"):
        assert (out / name).is_file(), name
    for name in ("metrics.png", "predictions.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.png",
        "predictions.png",
        "report.json",
        "report.md",
    ]  # atomic writes leave no temporary files

    teacher_net, tasks, _ = load_net(runs.teacher)
    student_net, _, _ = load_net(runs.student)
    t_params, s_params = count_parameters(teacher_net), count_parameters(student_net)
    assert t_params > s_params
    data = report.data
    assert data["profile"]["teacher"]["parameters"] == t_params
    assert data["profile"]["student"]["parameters"] == s_params
    assert data["ratios"]["compression"] == pytest.approx(t_params / s_params)
    assert data["profile"]["teacher"]["macs"] > data["profile"]["student"]["macs"] > 0
    markdown = (out / "report.md").read_text()
    assert f"| {t_params / s_params:.2f}x |" in markdown
    assert report.efficiency in markdown and report.table in markdown
    assert "![main metric per task](metrics.png)" in markdown

    header = report.table.splitlines()[0]
    assert header == f"| task | metric | {' | '.join(ROLES.values())} |"
    rows = [line.split(" | ") for line in report.table.splitlines()[2:]]
    assert {r[0].removeprefix("| ") for r in rows} == set(tasks)
    # Values are the evaluation's, per model: the teacher's main dr_grade metric, for example.
    metrics = json.loads((runs.teacher_dir / "metrics_test.json").read_text())["metrics"]
    kappa = next(r for r in rows if r[0] == "| dr_grade" and r[1] == "kappa *")
    assert kappa[2] == f"{metrics['test/dr_grade/kappa']:.4f}"
    assert not any(r[1] == "loss" for r in rows)


@pytest.mark.integration
def test_cli_report_without_baseline_omits_its_column(
    runs: TinyRuns, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "report"
    main(
        [
            f"teacher={runs.teacher_dir}",
            f"student={runs.student_dir}",
            f"baseline={tmp_path / 'never_trained'}",
            f"out={out}",
        ]
    )
    printed = capsys.readouterr().out
    assert "no baseline column" in caplog.text and "mtkd evaluate" in caplog.text
    assert "| task | metric | teacher | student KD |\n" in printed
    assert "student no KD" not in (out / "report.md").read_text()
    assert f"report written to {out / 'report.md'}" in printed
    assert set(json.loads((out / "report.json").read_text())["runs"]) == {"teacher", "student"}
