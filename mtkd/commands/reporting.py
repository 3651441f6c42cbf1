"""``mtkd report [teacher=RUN student=RUN baseline=RUN out=DIR]``: did distillation pay off?

Reads each run's ``metrics_test.json`` (written by ``mtkd evaluate``) and the checkpoint named in
it, then writes ``report.md`` with PNG figures and ``report.json``: test metrics of the teacher, the
distilled student and the student trained without KD; size and CPU speed of teacher and student
(the baseline shares the student's architecture); a bar chart of each task's main metric; a panel
of test images with every model's masks and points against the ground truth.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_modules.datamodule import FundusDataModule
from data_modules.io import atomic_write_bytes
from mtkd.commands.prediction import (
    activate,
    draw_overlay,
    layer_colors,
    legend_handles,
    spatial_layers,
)
from mtkd.evaluation import (
    BOOTSTRAP_RESAMPLES,
    LEVEL,
    check_paired,
    collect_outputs,
    intervals,
    paired_differences,
    resampled_values,
)
from mtkd.markdown import markdown_table
from mtkd.models.multitask import MultiTaskNet
from mtkd.modules.checkpoint import load_net
from mtkd.outputs import check_saved_paths
from mtkd.profiling import THROUGHPUT_BATCH, Profile, profile_net
from mtkd.status import status_logger
from mtkd.tasks import Task

log = status_logger(__name__)

#: role -> column title; the order of the columns
ROLES = {"teacher": "teacher", "student": "student KD", "baseline": "student no KD"}
METRICS_FILE = "metrics_test.json"
#: the differences the report tests, A − B on the same test images
PAIRS = (("student", "baseline"), ("student", "teacher"))
INTERVALS_NOTE = (
    f"Main metric per task, [lo, hi]: {LEVEL:.0%} percentile bootstrap interval over the test "
    f"images ({BOOTSTRAP_RESAMPLES} seeded resamples). Differences are paired: both models on "
    "the same resamples of the same images; 'not significant' where the interval spans 0."
)


@dataclass
class RunResult:
    role: str
    run_dir: Path
    checkpoint: Path
    #: "<task>/<metric>" -> value, the split prefix removed
    metrics: dict[str, float]


@dataclass
class Report:
    path: Path
    #: the metrics comparison as a Markdown table (what ``mtkd demo`` prints)
    table: str
    #: teacher vs student size and speed as a Markdown table
    efficiency: str
    data: dict[str, Any]
    #: each task's main metric with 95 % intervals and paired differences (Markdown table)
    intervals: str
    #: the tasks KD won, lost and tied against no KD (``verdict_line``); empty without a baseline
    verdict: str = ""


def load_result(role: str, run_dir: str | Path) -> RunResult:
    """A run's test metrics and checkpoint, with the command to run when they are missing."""
    run_dir = Path(run_dir)
    file = run_dir / METRICS_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: evaluate the {ROLES[role]} first, e.g. "
            f"`mtkd evaluate ckpt={run_dir}/checkpoints/best.ckpt split=test`"
        )
    payload = json.loads(file.read_text())
    ckpt = Path(payload["checkpoint"])
    if not ckpt.is_file():  # a relative path written from another working directory
        ckpt = run_dir / "checkpoints" / ckpt.name
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"{file} names checkpoint {payload['checkpoint']}, which does not exist (nor {ckpt})"
        )
    metrics = {k.split("/", 1)[1]: float(v) for k, v in payload["metrics"].items() if "/" in k}
    return RunResult(role, run_dir, ckpt, metrics)


def metric_rows(tasks: dict[str, Task], results: list[RunResult]) -> list[list[str]]:
    """Rows task | metric | one value per run: the task's main metric first (marked *), then the
    others alphabetically; losses are left out (they are not comparable across KD settings)."""
    rows = []
    for name, task in tasks.items():
        main = task.main_metric
        found = {k.split("/", 1)[1] for r in results for k in r.metrics if k.startswith(f"{name}/")}
        found.discard("loss")
        for metric in sorted(found, key=lambda m: (m != main, m)):
            values = [r.metrics.get(f"{name}/{metric}") for r in results]
            label = f"{metric} *" if metric == main else metric
            rows.append([name, label, *("–" if v is None else f"{v:.4f}" for v in values)])
    return rows


def bootstrap_comparison(
    tasks: dict[str, Task], results: list[RunResult], loaded: dict[str, tuple]
) -> tuple[str, dict[str, Any]]:
    """Each model's main metric per task with its 95 % bootstrap interval over the test images,
    and the paired interval of each difference in ``PAIRS``: both models scored on the same
    resamples of the same images, so what the images share cancels. A difference whose interval
    spans 0 is marked "not significant". Returns the Markdown table and the numbers."""
    values, per_model = {}, {}
    for r in results:
        net, model_tasks, cfg = loaded[r.role]
        dm = FundusDataModule(cfg.data, model_tasks)
        per_model[r.role] = collect_outputs(net, dm, "test", torch.device("cpu"))
        values[r.role] = resampled_values(model_tasks, per_model[r.role], [], BOOTSTRAP_RESAMPLES)
    roles = [r.role for r in results]
    metrics = {r.role: r.metrics for r in results}
    pairs = [(a, b) for a, b in PAIRS if a in roles and b in roles]
    paired = {}
    for a, b in pairs:
        check_paired(per_model[a], per_model[b], f"report, {ROLES[a]} vs {ROLES[b]}")
        paired[f"{a} - {b}"] = paired_differences(values[a], values[b])
    bounds = {role: intervals(v) for role, v in values.items()}
    header = ["task", "metric", *(ROLES[r] for r in roles)]
    header += [f"{ROLES[a]} − {ROLES[b]}" for a, b in pairs]
    rows = []
    for name, task in tasks.items():
        metric = task.main_metric
        key = f"{name}/{metric}"
        if not all(key in bounds[r] for r in roles):
            continue
        row = [name, f"{metric} ({'higher' if task.higher_is_better() else 'lower'} is better)"]
        for r in results:
            lo, hi = bounds[r.role][key]
            row.append(f"{r.metrics[key]:.3f} [{lo:.3f}, {hi:.3f}]")
        for a, b in pairs:
            diff = paired[f"{a} - {b}"][key]
            value = metrics[a][key] - metrics[b][key]
            verdict = "" if diff["significant"] else " not significant"
            row.append(f"{value:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]{verdict}")
        rows.append(row)
    data = {
        "resamples": BOOTSTRAP_RESAMPLES,
        "level": LEVEL,
        "intervals": bounds,
        "paired": paired,
    }
    return markdown_table(header, rows), data


def kd_verdict(tasks: dict[str, Task], paired: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Each task under won, lost or tied by its main metric's paired interval of KD − no KD
    (``paired``, as ``paired_differences`` gives it): won where the whole interval lies on the
    better side of 0, lost where it lies on the worse side, tied where it spans 0."""
    verdict: dict[str, list[str]] = {"won": [], "lost": [], "tied": []}
    for name, task in tasks.items():
        diff = paired.get(f"{name}/{task.main_metric}")
        if diff is None:
            continue
        higher = task.higher_is_better()
        better = diff["lo"] > 0 if higher else diff["hi"] < 0
        worse = diff["hi"] < 0 if higher else diff["lo"] > 0
        verdict["won" if better else "lost" if worse else "tied"].append(name)
    return verdict


def verdict_line(verdict: dict[str, list[str]]) -> str:
    """``KD vs no KD (95 % paired intervals): won 5 of 7 (a, b, ...); lost ...; tied ...``."""
    total = sum(len(v) for v in verdict.values())
    parts = [
        f"{outcome} {len(names)} of {total}" + (f" ({', '.join(names)})" if names else "")
        for outcome, names in verdict.items()
    ]
    return f"KD vs no KD ({LEVEL:.0%} paired intervals of each task's main metric): " + "; ".join(
        parts
    )


def ratios(teacher: Profile, student: Profile) -> dict[str, float]:
    """How much smaller and faster the student is (teacher / student; > 1 favours the student)."""
    return {
        "compression": teacher.parameters / student.parameters,
        "macs": teacher.macs / student.macs,
        "latency_speedup": teacher.latency_ms / student.latency_ms,
        "latency_one_thread_speedup": teacher.latency_one_thread_ms / student.latency_one_thread_ms,
        "throughput_speedup": student.throughput / teacher.throughput,
    }


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def efficiency_table(teacher: Profile, student: Profile) -> str:
    r = ratios(teacher, student)
    rows = [
        [
            "parameters",
            _si(teacher.parameters),
            _si(student.parameters),
            f"{r['compression']:.2f}x",
        ],
        ["MACs per image", _si(teacher.macs), _si(student.macs), f"{r['macs']:.2f}x"],
        [
            f"CPU latency, batch 1, {teacher.threads} thread(s) (ms)",
            f"{teacher.latency_ms:.1f}",
            f"{student.latency_ms:.1f}",
            f"{r['latency_speedup']:.2f}x",
        ],
        [
            "CPU latency, batch 1, 1 thread (ms)",
            f"{teacher.latency_one_thread_ms:.1f}",
            f"{student.latency_one_thread_ms:.1f}",
            f"{r['latency_one_thread_speedup']:.2f}x",
        ],
        [
            f"CPU throughput, batch {THROUGHPUT_BATCH} (img/s)",
            f"{teacher.throughput:.1f}",
            f"{student.throughput:.1f}",
            f"{r['throughput_speedup']:.2f}x",
        ],
    ]
    header = [f"teacher at {teacher.image_size} px", f"student at {student.image_size} px"]
    return markdown_table(["", *header, "teacher / student"], rows)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def metrics_figure(tasks: dict[str, Task], results: list[RunResult]) -> bytes:
    """One small bar chart per task: its main metric for each model."""
    from matplotlib.figure import Figure

    cols = min(len(tasks), 4)
    rows = -(-len(tasks) // cols)
    fig = Figure(figsize=(2.6 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = ["#4c72b0", "#dd8452", "#8c8c8c"]
    for ax, (name, task) in zip(axes, tasks.items()):
        metric = task.main_metric
        values = [r.metrics.get(f"{name}/{metric}", np.nan) for r in results]
        bars = ax.bar(range(len(results)), values, color=colors[: len(results)])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(results)), [ROLES[r.role] for r in results], fontsize=8)
        better = "higher" if task.higher_is_better() else "lower"
        ax.set_title(f"{name}: {metric} ({better} is better)", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(tasks) :]:
        ax.set_axis_off()
    return _png(fig)


def predictions_figure(
    tasks: dict[str, Task],
    nets: dict[str, MultiTaskNet],
    data_cfg: Any,
    n_images: int,
) -> bytes:
    """Rows: the first test images; columns: ground truth, then each model's masks and points."""
    from matplotlib.figure import Figure

    dataset = FundusDataModule(data_cfg, tasks).dataset("test")
    items = [dataset[i] for i in range(min(n_images, len(dataset)))]
    images = torch.stack([it["image"] for it in items])
    with torch.inference_mode():
        outputs = {role: activate(tasks, net(images)) for role, net in nets.items()}
    mean = torch.tensor(list(data_cfg.mean)).view(3, 1, 1)
    std = torch.tensor(list(data_cfg.std)).view(3, 1, 1)
    colors = layer_colors(tasks)
    columns = ["ground truth", *(ROLES[r] for r in nets)]
    fig = Figure(figsize=(2.4 * len(columns) + 2.2, 2.4 * len(items)), layout="constrained")
    axes = fig.subplots(len(items), len(columns), squeeze=False)
    for row, item in enumerate(items):
        pixels = (item["image"] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        has = {n: bool(v) for n, v in item["has"].items()}
        layers = [spatial_layers(tasks, item["targets"], has)]
        layers += [
            spatial_layers(tasks, {n: v[row] for n, v in out.items()}) for out in outputs.values()
        ]
        for col, (masks, points) in enumerate(layers):
            ax = axes[row][col]
            draw_overlay(ax, pixels, masks, points, colors)
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
        axes[row][0].text(
            -0.04,
            0.5,
            item["sample_id"],
            transform=axes[row][0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=7,
        )
    handles = legend_handles(colors)
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return _png(fig)


def build_report(
    runs: dict[str, str | Path],
    out: str | Path = "runs/report",
    n_images: int = 4,
    repeats: int = 5,
) -> Report:
    """Write report.md, report.json, metrics.png and predictions.png to ``out``. ``runs`` maps
    teacher, student and (optionally) baseline to run directories; a baseline without test
    metrics is left out with a note."""
    out = Path(out)
    results = [load_result("teacher", runs["teacher"]), load_result("student", runs["student"])]
    if runs.get("baseline"):
        try:
            results.append(load_result("baseline", runs["baseline"]))
        except FileNotFoundError as exc:
            log.warning(f"report: no baseline column ({exc})")
    loaded = {r.role: load_net(r.checkpoint) for r in results}
    for r in results:  # each model is scored on the data its checkpoint names: read, never made
        check_saved_paths(loaded[r.role][2].data, [], r.checkpoint)
    nets = {role: net for role, (net, _, _) in loaded.items()}
    tasks, cfg = loaded["student"][1], loaded["student"][2]
    # Each model at its own working size: a student distilled at 96 px from a 128 px teacher
    # runs at 96 px, and that is the speed it is deployed with.
    profiles = {
        role: profile_net(nets[role], int(loaded[role][2].data.image_size), repeats)
        for role in ("teacher", "student")
    }
    rows = metric_rows(tasks, results)
    table = markdown_table(["task", "metric", *(ROLES[r.role] for r in results)], rows)
    comparison, bootstrap = bootstrap_comparison(tasks, results, loaded)
    verdict = ""
    if "student - baseline" in bootstrap["paired"]:
        bootstrap["verdict"] = kd_verdict(tasks, bootstrap["paired"]["student - baseline"])
        verdict = verdict_line(bootstrap["verdict"])
    figures = {
        "metrics.png": metrics_figure(tasks, results),
        "predictions.png": predictions_figure(tasks, nets, cfg.data, n_images),
    }
    for name, png in figures.items():
        atomic_write_bytes(out / name, png)
    data = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": {
            r.role: {
                "run_dir": str(r.run_dir),
                "checkpoint": str(r.checkpoint),
                "metrics": r.metrics,
            }
            for r in results
        },
        "profile": {role: p.as_dict() for role, p in profiles.items()},
        "ratios": ratios(profiles["teacher"], profiles["student"]),
        "bootstrap": bootstrap,
    }
    efficiency = efficiency_table(profiles["teacher"], profiles["student"])
    markdown = render_markdown(
        results, loaded, profiles["teacher"], table, efficiency, f"{comparison}\n\n{verdict}"
    )
    atomic_write_bytes(out / "report.md", markdown.encode())
    atomic_write_bytes(out / "report.json", json.dumps(data, indent=1).encode())
    return Report(out / "report.md", table, efficiency, data, comparison, verdict)


def render_markdown(
    results: list[RunResult],
    loaded: dict[str, tuple],
    teacher: Profile,
    table: str,
    efficiency: str,
    comparison: str,
) -> str:
    cfg = loaded["student"][2]
    sources = ", ".join(f"{n} ({s.kind})" for n, s in cfg.data.sources.items())
    sizes = ", ".join(f"{ROLES[r.role]} {loaded[r.role][2].data.image_size} px" for r in results)
    models = markdown_table(
        ["", "run", "checkpoint", "encoder", "KD"],
        [
            [
                ROLES[r.role],
                f"`{r.run_dir}`",
                f"`{r.checkpoint}`",
                loaded[r.role][2].model.encoder,
                loaded[r.role][2].kd.mode if r.role != "teacher" else "–",
            ]
            for r in results
        ],
    )
    return f"""# mtkd report: teacher vs distilled student

Test split of {sources}, each model at its own working size: {sizes}.

## Models

{models}

## Test metrics

`*` marks each task's main metric (the one charted below).

{table}

![main metric per task](metrics.png)

## Intervals and paired differences

{INTERVALS_NOTE}

{comparison}

## Size and CPU speed

Median of timed forward passes after warm-up, {teacher.threads} torch thread(s) (batch-1
latency also on one thread, the usual way to serve one request per CPU core), random input at
each model's working size (in the header). The no-KD baseline has the student's architecture.

{efficiency}

## Test images

Tinted masks and `X` points: ground truth (where labeled) and each model's prediction.

![test predictions](predictions.png)
"""
