"""Bootstrap intervals over test images: hand-computed resamples, exact percentiles, the
degenerate case, each kind's resampled metrics against its own torchmetrics on the identity
resample, paired differences, and ``mtkd evaluate`` writing and printing the intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtkd.commands.reporting import build_report
from mtkd.evaluation import (
    TaskOutputs,
    joint_outputs,
    paired_differences,
    percentile_interval,
    resample_draws,
    resampled_values,
)
from mtkd.modules.checkpoint import load_net
from mtkd.stages import evaluate
from mtkd.tasks import build_tasks
from mtkd.tasks.base import Task
from tests.conftest import TinyRuns

TASKS = build_tasks(
    {
        "grade": {"kind": "classification", "num_classes": 3},
        "cdr": {"kind": "regression"},
        "lesions": {"kind": "segmentation", "classes": ["a", "b", "never"]},
        "points": {"kind": "localization", "points": ["disc", "fovea"]},
        "heatmap": {"kind": "localization", "points": ["disc", "fovea"], "head": "heatmap"},
    }
)


def _outputs(name: str, pred: torch.Tensor, target: torch.Tensor, scale=None) -> TaskOutputs:
    n = len(pred)
    scale = torch.full((n, 2), 100.0) if scale is None else scale
    return TaskOutputs([f"s{i:02d}" for i in range(n)], pred, target, {"pixel_scale": scale})


@pytest.mark.unit
def test_mae_over_four_images_with_a_fixed_resample_matrix() -> None:
    """Errors 1, 2, 3, 4: the three resamples below average to 1, 2.5 and 3.5 by hand."""
    target = torch.zeros(4, 1)
    pred = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    draws = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [3, 3, 2, 2]])
    values = TASKS["cdr"].resampled_metrics(pred, target, {}, draws)
    assert values["mae"].tolist() == pytest.approx([1.0, 2.5, 3.5])
    assert values["rmse"][1] == pytest.approx((30 / 4) ** 0.5)


@pytest.mark.unit
def test_percentile_interval_is_exact_on_0_to_100_and_skips_nan() -> None:
    assert percentile_interval(torch.arange(101.0)) == pytest.approx((2.5, 97.5))
    with_nan = torch.cat([torch.arange(101.0), torch.full((5,), float("nan"))])
    assert percentile_interval(with_nan) == pytest.approx((2.5, 97.5))
    assert percentile_interval(torch.arange(11.0), level=0.8) == pytest.approx((1.0, 9.0))


@pytest.mark.unit
def test_draws_are_seeded_and_in_range() -> None:
    draws = resample_draws(7, 50, seed=3)
    assert draws.shape == (50, 7) and 0 <= int(draws.min()) and int(draws.max()) < 7
    assert torch.equal(draws, resample_draws(7, 50, seed=3))
    assert not torch.equal(draws, resample_draws(7, 50, seed=4))


@pytest.mark.unit
def test_all_images_equal_gives_zero_width_intervals() -> None:
    n = 12
    outputs = {
        "cdr": _outputs("cdr", torch.full((n, 1), 0.7), torch.full((n, 1), 0.2)),
        "lesions": _outputs(
            "lesions",
            torch.tensor([4.0, -4.0, -4.0]).view(1, 3, 1, 1).expand(n, 3, 8, 8).clone(),
            torch.zeros(n, 3, 8, 8).index_fill_(1, torch.tensor([0]), 1.0),
        ),
    }
    values = resampled_values(TASKS, outputs, [], resamples=200)
    for key in ("cdr/mae", "lesions/dice", "lesions/dice_a", "lesions/iou"):
        lo, hi = percentile_interval(values[key])
        assert lo == hi, key
    assert percentile_interval(values["cdr/mae"]) == pytest.approx((0.5, 0.5))
    assert percentile_interval(values["lesions/dice_a"]) == (1.0, 1.0)


def _random_outputs(n: int = 30) -> dict[str, TaskOutputs]:
    g = torch.Generator().manual_seed(0)
    seg_target = (torch.rand(n, 3, 16, 16, generator=g) < 0.2).float()
    seg_target[:, 2] = 0  # a class no image shows and no model predicts
    seg_pred = torch.randn(n, 3, 16, 16, generator=g)
    seg_pred[:, 2] = -5
    return {
        "grade": _outputs("grade", torch.randn(n, 3, generator=g), torch.arange(n) % 3),
        "cdr": _outputs("cdr", torch.rand(n, 1, generator=g), torch.rand(n, 1, generator=g)),
        "lesions": _outputs("lesions", seg_pred, seg_target),
        "points": _outputs(
            "points",
            torch.rand(n, 2, 2, generator=g),
            torch.rand(n, 2, 2, generator=g),
            torch.rand(n, 2, generator=g) * 500,
        ),
        "heatmap": _outputs(
            "heatmap",
            torch.randn(n, 2, 8, 8, generator=g) * 3,
            torch.rand(n, 2, 2, generator=g),
            torch.rand(n, 2, generator=g) * 500,
        ),
    }


@pytest.mark.unit
def test_the_identity_resample_reproduces_each_kinds_own_metrics() -> None:
    """Row 0 draws every image once: each task's resampled metrics equal its torchmetrics
    collection on the whole set (segmentation's count-based override included, with an empty
    class; localization's pixel distances through pixel_scale, from regressed points and from
    heatmaps)."""
    for name, out in _random_outputs().items():
        task = TASKS[name]
        n = len(out.ids)
        draws = torch.stack([torch.arange(n), torch.randint(0, n, (n,))])
        values = task.resampled_metrics(out.pred, out.target, out.extras, draws)
        metrics = task.metrics()
        task.update_metrics(metrics, out.pred, out.target, out.extras)
        expected = {k: float(v) for k, v in metrics.compute().items()}
        assert set(values) == set(expected), name
        for key, value in expected.items():
            assert float(values[key][0]) == pytest.approx(value, abs=1e-6), f"{name}/{key}"


@pytest.mark.unit
@pytest.mark.parametrize("name", ["grade", "points", "heatmap"])
def test_count_based_resampling_equals_the_metrics_on_every_resample(name: str) -> None:
    """The kinds that score resamples from per-image statistics (classification's confusion
    matrices, localization's distances) equal the base class's rerun of their torchmetrics on
    each of 300 resamples of 12 images: small enough that resamples miss classes (balanced
    accuracy over the classes shown, AUROC 0 for a class absent), one resample holds a single
    image (kappa NaN); scores tie (rounded logits)."""
    g = torch.Generator().manual_seed(1)
    n = 12
    out = _random_outputs(n)[name]
    pred = out.pred.round() if name == "grade" else out.pred
    target = torch.tensor([0, 0, 2, 0, 0, 1, 1, 1, 1, 0, 2, 1]) if name == "grade" else out.target
    draws = torch.randint(0, n, (300, n), generator=g)
    draws[0] = 0  # one image drawn 12 times: one class on both sides
    task = TASKS[name]
    fast = task.resampled_metrics(pred, target, out.extras, draws)
    with torch.no_grad():
        slow = Task.resampled_metrics(task, pred, target, out.extras, draws)
    assert set(fast) == set(slow)
    for key, values in slow.items():
        assert torch.allclose(fast[key].double(), values, atol=1e-5, equal_nan=True), key
    if name == "grade":  # the cases above occurred
        assert slow["kappa"][0].isnan() and slow["auroc"][0] == 0 and (slow["auroc"] < 0.5).any()


@pytest.mark.unit
def test_joint_outputs_mark_images_where_every_task_is_right() -> None:
    a = TaskOutputs(["x", "y", "z"], torch.eye(3), torch.tensor([0, 1, 0]), {})
    b = TaskOutputs(["y", "z"], torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([1, 1]), {})
    tasks = build_tasks(
        {
            "a": {"kind": "classification", "num_classes": 3},
            "b": {"kind": "classification", "num_classes": 2},
        }
    )
    joint = joint_outputs(tasks, {"a": a, "b": b}, ("a", "b"))
    assert joint.ids == ["y", "z"] and joint.pred.tolist() == [1.0, 0.0]
    assert joint_outputs(tasks, {"a": a}, ("a", "b")) is None


@pytest.mark.unit
def test_paired_difference_of_identical_models_is_exactly_zero_and_not_significant() -> None:
    outputs = _random_outputs()
    a = resampled_values(TASKS, outputs, [], resamples=100)
    b = resampled_values(TASKS, outputs, [], resamples=100)
    diffs = paired_differences(a, b)
    assert set(diffs) == set(a)
    for key, d in diffs.items():
        assert (d["lo"], d["hi"], d["significant"]) == (0.0, 0.0, False), key


@pytest.mark.unit
def test_paired_difference_of_a_better_model_is_significant() -> None:
    """Same images, same draws: a model whose errors are all 0.1 smaller is better on every
    resample, so the interval of the MAE difference is exactly [-0.1, -0.1]."""
    target = torch.rand(20, 1, generator=torch.Generator().manual_seed(1))
    worse = {"cdr": _outputs("cdr", target + 0.3, target)}
    better = {"cdr": _outputs("cdr", target + 0.2, target)}
    diff = paired_differences(
        resampled_values(TASKS, better, [], 100), resampled_values(TASKS, worse, [], 100)
    )["cdr/mae"]
    assert diff["lo"] == pytest.approx(-0.1) and diff["hi"] == pytest.approx(-0.1)
    assert diff["significant"]


@pytest.mark.integration
def test_evaluate_writes_and_prints_an_interval_per_metric(
    runs: TinyRuns, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "metrics.json"
    metrics = evaluate(str(runs.student), "test", [], out=str(out), bootstrap=200)
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["bootstrap"] == {"resamples": 200, "seed": 0, "level": 0.95}
    ci = payload["ci"]
    scored = {k for k in metrics if k.count("/") == 2 and not k.endswith("/loss")}
    assert scored <= set(ci)
    for key in scored:
        lo, hi = ci[key]
        assert lo <= hi, key
    lo, hi = ci["test/dr_grade/kappa"]
    assert f"kappa={metrics['test/dr_grade/kappa']:.4f} [{lo:.4f}, {hi:.4f}]" in printed
    assert "95% percentile bootstrap interval" in printed
    # Seeded: a rerun draws the same resamples.
    evaluate(str(runs.student), "test", [], out=str(tmp_path / "again.json"), bootstrap=200)
    assert json.loads((tmp_path / "again.json").read_text())["ci"] == ci
    evaluate(str(runs.student), "test", [], out=str(tmp_path / "none.json"), bootstrap=0)
    assert "ci" not in json.loads((tmp_path / "none.json").read_text())


@pytest.mark.integration
def test_report_pairs_models_on_the_same_resamples(runs: TinyRuns, tmp_path: Path) -> None:
    """The student's run doubles as the baseline: KD − no KD is the same model twice, so every
    paired interval is exactly [0, 0] and "not significant"; KD − teacher is shown too."""
    report = build_report(
        {"teacher": runs.teacher_dir, "student": runs.student_dir, "baseline": runs.student_dir},
        tmp_path / "report",
        n_images=1,
        repeats=1,
    )
    lines = report.intervals.splitlines()
    assert lines[0] == (
        "| task | metric | teacher | student KD | student no KD | student KD − student no KD "
        "| student KD − teacher |"
    )
    rows = [line.split(" | ") for line in lines[2:]]
    assert {r[0].removeprefix("| ") for r in rows} == set(load_net(runs.student)[1])
    for row in rows:
        assert row[5] == "+0.000 [+0.000, +0.000] not significant", row
    paired = report.data["bootstrap"]["paired"]["student - baseline"]
    assert all(d == {"lo": 0.0, "hi": 0.0, "significant": False} for d in paired.values())
    kappa = next(r for r in rows if r[0] == "| dr_grade")
    teacher = json.loads((runs.teacher_dir / "metrics_test.json").read_text())["metrics"]
    assert kappa[2].startswith(f"{teacher['test/dr_grade/kappa']:.3f} [")
    assert report.intervals in (tmp_path / "report" / "report.md").read_text()
    n = len(rows)  # the same model twice: every task tied
    assert f": won 0 of {n}; lost 0 of {n}; tied {n} of {n} (dr_grade, " in report.verdict
    assert report.verdict in (tmp_path / "report" / "report.md").read_text()
