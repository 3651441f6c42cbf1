"""``mtkd study [study=label_efficiency] [study.KEY=VALUE ...] [overrides]``: the label-efficiency
study. For each label fraction, seed and arm (``kd``: the teacher cache teaches every training
image, the unlabeled remainder by KD only; ``nokd``: labels only), train the same student under
the same budget and score it on the test split; then the mean and 95 % t-interval across seeds
of each task's headline metric (``Task.main_metric``), the KD gain, a plot and results JSON.

The two teacher variants answer two questions. ``study.teacher=all`` (the default study file)
trains one teacher on every label: a teacher trained where labels are plentiful, distilled into
a student for a setting with few (the demo's scenario, and the reference's). ``fraction`` trains
one teacher per fraction on that fraction's labels only, so it never saw the labels the student
lacks: what KD adds through the unlabeled images alone. Seeds vary the student's
initialisation and batch order; the labeled patients and the test split are fixed by
``data.split_seed`` (fractions are nested: the 10 % patients are among the 25 %). Checkpoints
are chosen on the fully labeled validation split, the same way in both arms.

A finished cell (its ``metrics_test.json`` exists) is not rerun, nor a finished teacher (its
``metrics_val.json``) or cache, so an interrupted study continues where it stopped: a run killed
during training resumes from the checkpoint it left (``run.resume``), a cell killed after
training is only evaluated. The settings that define the protocol are saved in
``protocol.json``, the resolved stage configs included (the teacher's and each arm's student's,
without the keys that differ per cell), so a rerun whose configs differ (another override, a
``config_dir`` file that shadows a built-in one, another mtkd version) is refused, naming them.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from scipy import stats

from data_modules.io import atomic_write_bytes
from mtkd.commands.demo_runs import trust_teacher
from mtkd.config import dotlist, read_group, search_path, to_container
from mtkd.markdown import markdown_table
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, evaluate, fit, pipeline_keys_taken, refuse_fast_dev_run
from mtkd.status import status_logger
from mtkd.tasks import build_tasks

log = status_logger(__name__)

ARMS = {"kd": "KD", "nokd": "no KD"}
TEACHERS = ("fraction", "all")
#: what the study sets itself for each stage beyond ``PIPELINE_KEYS`` (choose them with study.*
#: keys instead)
STUDY_KEYS = (
    "run.seed",
    "kd.teachers",
    "data.label_fraction",
    "trainer.max_epochs",
    "logger.group",
    "logger.name",
)
LEVEL = 0.95
#: keys of the stage configs that differ from cell to cell or only name things: left out of
#: the protocol (``logger``: names and where to log, not what is trained)
PER_CELL = (
    "run.dir",
    "run.seed",
    "run.resume",
    "data.label_fraction",
    "kd.cache_dir",
    "kd.teacher",
    "cache.teacher",
    "logger",
)
#: how many differing protocol keys a refusal names
SHOWN_KEYS = 5


@dataclass
class StudyConfig:
    """One study: the grid, the budget and where it writes."""

    name: str = "label_efficiency"
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: ["kd", "nokd"])
    #: "fraction": one teacher per fraction on its labels only; "all": one on every label
    teacher: str = "fraction"
    teacher_seed: int = 0
    teacher_epochs: int = 12
    #: the same for both arms: the comparison is at equal budget
    student_epochs: int = 10
    out: str = "runs/study/label_efficiency"
    #: stage overrides for every stage (before the command line's)
    overrides: list[str] = field(default_factory=list)
    #: stage overrides of the teacher only, e.g. [model=teacher_pretrained]
    teacher_overrides: list[str] = field(default_factory=list)
    #: stage overrides of both arms' students (and the cache, written for them), e.g.
    #: [model=student_pretrained]
    student_overrides: list[str] = field(default_factory=list)
    #: the KD arm weighs the teacher as the demo's KD student does on its classification heads
    #: (``demo_runs.trust_teacher``): at a tenth of the labels a batch holds one or two labeled
    #: images, whose cross-entropy at the run-wide alpha kept those heads at their prior
    trust_teacher: bool = False


def load_study(name: str, rest: list[str]) -> tuple[StudyConfig, list[str]]:
    """The study ``name`` (a file of the ``study`` config group, or a YAML path) with the
    ``study.KEY=VALUE`` items of ``rest`` applied, and the stage overrides (the other items)."""
    values = [a.removeprefix("study.") for a in rest if a.startswith("study.")]
    stage = [a for a in rest if not a.startswith("study.")]
    path, _ = search_path(stage)
    schema = OmegaConf.structured(StudyConfig)
    try:
        merged = OmegaConf.merge(schema, read_group("study", name, path))
        merged = OmegaConf.merge(merged, dotlist(values))
    except OmegaConfBaseException as exc:
        valid = ", ".join(f"study.{k}" for k in schema)
        raise ValueError(f"study config: {exc.msg}; valid keys: {valid}") from None
    study = StudyConfig(**OmegaConf.to_container(merged))
    check_study(study, [*study.overrides, *stage])
    return study, [*study.overrides, *stage]


def check_study(study: StudyConfig, overrides: list[str]) -> None:
    problems = []
    if not study.fractions or not all(0 < f <= 1 for f in study.fractions):
        problems.append(f"study.fractions={study.fractions} must be label fractions in (0, 1]")
    if not study.seeds:
        problems.append("study.seeds is empty")
    if not study.arms or not set(study.arms) <= set(ARMS):
        problems.append(f"study.arms={study.arms} must be among {list(ARMS)}")
    if study.teacher not in TEACHERS:
        problems.append(f"study.teacher={study.teacher!r} must be one of {list(TEACHERS)}")
    if min(study.teacher_epochs, study.student_epochs) < 1:
        problems.append("study.teacher_epochs and study.student_epochs must be >= 1")
    taken = pipeline_keys_taken(
        [*overrides, *study.teacher_overrides, *study.student_overrides], STUDY_KEYS
    )
    if taken:
        problems.append(
            f"the study sets {taken} itself for each stage; use study.fractions, study.seeds, "
            "study.teacher_epochs, study.student_epochs and study.out instead"
        )
    if problems:
        raise ValueError("; ".join(problems))


def teacher_tag(study: StudyConfig, fraction: float) -> str:
    return "all" if study.teacher == "all" else f"f{fraction:g}"


def teacher_args(study: StudyConfig, overrides: list[str], fraction: float) -> list[str]:
    """The overrides of the fraction's teacher run."""
    tag = teacher_tag(study, fraction)
    return [
        *overrides,
        *study.teacher_overrides,
        f"run.dir={Path(study.out) / f'teacher_{tag}'}",
        f"run.seed={study.teacher_seed}",
        f"data.label_fraction={1.0 if study.teacher == 'all' else fraction}",
        f"trainer.max_epochs={study.teacher_epochs}",
        f"logger.group={study.name}",
        f"logger.name=teacher_{tag}",
    ]


@dataclass(frozen=True)
class Cell:
    """One student of the study: a label fraction, a seed and an arm."""

    fraction: float
    seed: int
    arm: str

    @property
    def name(self) -> str:
        return f"f{self.fraction:g}_s{self.seed}_{self.arm}"

    def dir(self, study: StudyConfig) -> Path:
        return Path(study.out) / f"f{self.fraction:g}" / f"seed{self.seed}" / self.arm


def student_args(
    study: StudyConfig, overrides: list[str], cell: Cell, teacher: tuple[Path, Path] | None
) -> list[str]:
    """The overrides of one cell's student; ``teacher``: the fraction's teacher checkpoint and
    cache, which the KD arm reads."""
    if cell.arm == "kd":
        ckpt, cache = teacher
        kd = ["kd=cached", f"kd.cache_dir={cache}", f"kd.teacher={ckpt}"]
        if study.trust_teacher:
            tasks = load_config("distill", [*overrides, *study.student_overrides]).tasks
            kd += trust_teacher(tasks)
    else:
        kd = ["kd=none"]
    return [
        *overrides,
        *study.student_overrides,
        *kd,
        f"run.dir={cell.dir(study)}",
        f"run.seed={cell.seed}",
        f"data.label_fraction={cell.fraction}",
        f"trainer.max_epochs={study.student_epochs}",
        f"logger.group={study.name}",
        f"logger.name={cell.name}",
    ]


def stage_configs(study: StudyConfig, overrides: list[str]) -> dict[str, DictConfig]:
    """The resolved configs the study trains with: its teacher and each arm's student (shown
    for the first fraction and seed; PER_CELL lists what the others change)."""
    fraction, seed = study.fractions[0], study.seeds[0]
    configs = {"teacher": load_config("teacher", teacher_args(study, overrides, fraction))}
    teacher = (Path(study.out) / "teacher.ckpt", Path(study.out) / "cache")  # both PER_CELL
    for arm in ARMS:
        student = student_args(study, overrides, Cell(fraction, seed, arm), teacher)
        configs[f"student_{arm}"] = load_config("distill", student)
    return configs


def without(tree: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of a nested dict without the dotted ``keys``."""
    out = json.loads(json.dumps(tree))
    for key in keys:
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node.get(name, {})
        node.pop(leaf, None)
    return out


def protocol(study: StudyConfig, configs: dict[str, DictConfig]) -> dict[str, Any]:
    """What every cell of one study shares; fractions and seeds may grow between runs."""
    return {
        "teacher": study.teacher,
        "teacher_seed": study.teacher_seed,
        "teacher_epochs": study.teacher_epochs,
        "student_epochs": study.student_epochs,
        "configs": {name: without(to_container(c), PER_CELL) for name, c in configs.items()},
    }


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ, in order; a key only one side has counts whole."""
    found = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif key not in saved or key not in current or old != new:
            found.append(f"{prefix}{key}")
    return found


def check_protocol(out: Path, current: dict[str, Any]) -> None:
    """Refuse to mix cells trained under different settings in one output folder."""
    file = out / "protocol.json"
    if file.is_file():
        changed = differences(json.loads(file.read_text()), json.loads(json.dumps(current)))
        if changed:
            more = len(changed) - SHOWN_KEYS
            shown = ", ".join(changed[:SHOWN_KEYS]) + (f" and {more} more" if more > 0 else "")
            raise ValueError(
                f"{out} holds a study run with other settings ({shown} differ, see {file}); "
                f"give it another folder with study.out=DIR or delete {out}"
            )
    atomic_write_bytes(file, json.dumps(current, indent=1).encode())


def trained(label: str, stage: str, overrides: list[str]) -> Path:
    """The best checkpoint of the run that ``overrides`` name: the one its ``metrics_val.json``
    names when it finished, else trained now, resuming from the checkpoint an interrupted
    attempt left (last.ckpt, or best.ckpt when it was killed between the two writes of its
    first epoch)."""
    cfg = load_config(stage, overrides)
    run_dir = Path(cfg.run.dir)
    finished = run_dir / "metrics_val.json"
    if finished.is_file():
        log.info(f"[study] {label}: trained earlier, kept")
        return Path(json.loads(finished.read_text())["checkpoint"])
    left = [run_dir / "checkpoints" / n for n in ("last.ckpt", "best.ckpt")]
    resume = next((c for c in left if c.is_file()), None)
    if resume is None:
        log.info(f"[study] {label}: training")
        return fit(cfg)
    log.info(f"[study] {label}: interrupted earlier, resuming from {resume}")
    return fit(load_config(stage, [*overrides, f"run.resume={resume}"]))


def teacher_for(study: StudyConfig, overrides: list[str], fraction: float) -> tuple[Path, Path]:
    """The fraction's teacher checkpoint and cache, trained and written unless already there."""
    tag = teacher_tag(study, fraction)
    cache = Path(study.out) / f"cache_{tag}"
    best = trained(f"teacher {tag}", "teacher", teacher_args(study, overrides, fraction))
    if not (cache / "fingerprint.json").is_file():
        log.info(f"[study] teacher {tag}: caching its outputs")
        where = [f"cache.teacher=[{best}]", f"kd.cache_dir={cache}"]
        cache_teacher(load_config("distill", [*overrides, *study.student_overrides, *where]))
    return best, cache


def run_cell(
    study: StudyConfig, overrides: list[str], cell: Cell, teacher: tuple[Path, Path] | None
) -> dict[str, float]:
    """Train one student and score it on the test split; a finished cell is read back."""
    metrics_file = cell.dir(study) / "metrics_test.json"
    if metrics_file.is_file():
        log.info(f"[study] {cell.name}: finished earlier, kept")
    else:
        student = student_args(study, overrides, cell, teacher)
        best = trained(cell.name, "distill", student)
        evaluate(str(best), "test", [], out=str(metrics_file), bootstrap=0)
    return json.loads(metrics_file.read_text())["metrics"]


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and the t-interval of the mean across seeds (NaN bounds with one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def summarise(
    study: StudyConfig, tasks: dict[str, Any], cells: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per task: mean and t-interval across seeds per fraction and arm, and the KD gain (paired
    by seed, signed so that positive favours KD)."""
    summary = {}
    for name, task in tasks.items():
        metric, higher = task.main_metric, task.higher_is_better()
        key = f"test/{name}/{metric}"
        sign = 1.0 if higher else -1.0
        rows, gains = [], []
        for fraction in study.fractions:
            by_arm = {}
            for arm in study.arms:
                found = {
                    c["seed"]: c["metrics"][key]
                    for c in cells
                    if c["fraction"] == fraction and c["arm"] == arm and key in c["metrics"]
                }
                by_arm[arm] = found
                if found:
                    mean, lo, hi = t_interval(list(found.values()))
                    rows.append(
                        {"fraction": fraction, "arm": arm, "n": len(found), "mean": mean}
                        | {"lo": lo, "hi": hi}
                    )
            if {"kd", "nokd"} <= set(by_arm):
                seeds = sorted(set(by_arm["kd"]) & set(by_arm["nokd"]))
                diffs = [sign * (by_arm["kd"][s] - by_arm["nokd"][s]) for s in seeds]
                if diffs:
                    mean, lo, hi = t_interval(diffs)
                    gains.append(
                        {"fraction": fraction, "n": len(diffs), "mean": mean, "lo": lo, "hi": hi}
                    )
        mode = "max" if higher else "min"
        summary[name] = {"metric": metric, "mode": mode, "rows": rows, "gain": gains}
    return summary


def _cell(mean: float, lo: float, hi: float) -> str:
    return f"{mean:.3f}" if math.isnan(lo) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def results_table(study: StudyConfig, summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per fraction and arm, then the KD gain per fraction."""
    header = ["fraction", "arm", *(f"{n}: {s['metric']}" for n, s in summary.items())]
    rows = []
    for fraction in study.fractions:
        for arm in study.arms:
            cells = []
            for s in summary.values():
                row = next(
                    (r for r in s["rows"] if r["fraction"] == fraction and r["arm"] == arm), None
                )
                cells.append(_cell(row["mean"], row["lo"], row["hi"]) if row else "–")
            rows.append([f"{fraction:g}", ARMS[arm], *cells])
        gains = [
            next((g for g in s["gain"] if g["fraction"] == fraction), None)
            for s in summary.values()
        ]
        if any(gains):
            cells = ["–" if g is None else _cell(g["mean"], g["lo"], g["hi"]) for g in gains]
            rows.append([f"{fraction:g}", "KD gain", *cells])
    return header, rows


def describe(study: StudyConfig, summary: dict[str, Any]) -> str:
    """The lines that say how to read the table."""
    teacher = (
        "one teacher per fraction, trained on that fraction's labels only"
        if study.teacher == "fraction"
        else "one teacher trained on every label (study.teacher=all: labels plentiful elsewhere)"
    )
    modes = ", ".join(
        f"{n} {s['metric']} ({'higher' if s['mode'] == 'max' else 'lower'} is better)"
        for n, s in summary.items()
    )
    return (
        f"Study {study.name}: test split, mean [{LEVEL:.0%} t-interval] across "
        f"{len(study.seeds)} seed(s) {list(study.seeds)}; teacher: {teacher}; students "
        f"{study.student_epochs} epochs in both arms. KD gain: KD − no KD paired by seed, signed "
        f"so that positive favours KD. Metrics: {modes}. Chance: kappa 0."
    )


def plot(study: StudyConfig, summary: dict[str, Any]) -> bytes:
    """Headline metric vs label fraction per task, one line per arm, shaded t-intervals."""
    from matplotlib.figure import Figure

    cols = min(len(summary), 4)
    nrows = -(-len(summary) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (name, s) in zip(axes, summary.items()):
        for arm, color in zip(study.arms, ("#4c72b0", "#8c8c8c")):
            rows = sorted((r for r in s["rows"] if r["arm"] == arm), key=lambda r: r["fraction"])
            x = [r["fraction"] for r in rows]
            ax.plot(x, [r["mean"] for r in rows], "o-", color=color, label=ARMS[arm])
            ax.fill_between(
                x, [r["lo"] for r in rows], [r["hi"] for r in rows], color=color, alpha=0.2
            )
        better = "higher" if s["mode"] == "max" else "lower"
        ax.set_title(f"{name}: {s['metric']} ({better} is better)", fontsize=9)
        ax.set_xlabel("label fraction", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes[len(summary) :]:
        ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def log_study(
    overrides: list[str], study: StudyConfig, header: list, rows: list, png: Path
) -> None:
    """The table and plot as one W&B run (job type study) in the study's group, when the
    configured logger is W&B."""
    from mtkd.tracking.loggers import make_logger
    from mtkd.tracking.wandb_logger import log_study_summary

    cfg = load_config(
        "distill", [*overrides, f"logger.group={study.name}", "logger.name=study_summary"]
    )
    log_study_summary(make_logger(cfg, Path(study.out), job_type="study"), header, rows, png)


def run_study(study: StudyConfig, overrides: list[str]) -> dict[str, Any]:
    """Every cell (finished ones are kept), then table, plot and JSON under ``study.out``."""
    out = Path(study.out)
    configs = stage_configs(study, overrides)
    refuse_fast_dev_run(configs["teacher"], "study")
    check_protocol(out, protocol(study, configs))
    tasks = build_tasks(OmegaConf.to_container(configs["student_nokd"].tasks))
    cells = []
    for fraction in study.fractions:
        teacher = teacher_for(study, overrides, fraction) if "kd" in study.arms else None
        for seed in study.seeds:
            for arm in study.arms:
                metrics = run_cell(study, overrides, Cell(fraction, seed, arm), teacher)
                cells.append({"fraction": fraction, "seed": seed, "arm": arm, "metrics": metrics})
    summary = summarise(study, tasks, cells)
    header, rows = results_table(study, summary)
    note = describe(study, summary)
    table = markdown_table(header, rows)
    atomic_write_bytes(out / "study.png", plot(study, summary))
    atomic_write_bytes(out / "results.md", f"{note}\n\n{table}\n\n![study](study.png)\n".encode())
    results = {
        "study": study.name,
        "config": asdict(study),
        "note": note,
        "summary": summary,
        "cells": cells,
    }
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=1).encode())
    log_study(overrides, study, header, rows, out / "study.png")
    print(f"\n{note}\n\n{table}\n\nwritten to {out}: results.md, results.json, study.png")
    return results
