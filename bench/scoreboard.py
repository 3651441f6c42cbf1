"""The real-data scoreboard of bench/realdata.sh, from the run folders it leaves.

    python bench/scoreboard.py best  runs/real/<dataset>   # the KD variant to repeat over seeds
    python bench/scoreboard.py table runs/real/<dataset>   # the Markdown table

``best`` picks, on the validation split (never the test split), the KD variant
(``<model>/<arm>``) whose headline task's main metric is best; the headline task is the first of
the run's tasks (``dr_grade`` for IDRiD and RetinaMNIST), its main metric ``Task.main_metric``.
``table`` prints every run's test metrics, the 3-seed means with t-intervals, and per seed the
paired bootstrap interval of KD - no KD from ``mtkd report``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from scipy import stats

from mtkd.markdown import markdown_table
from mtkd.modules.checkpoint import read_checkpoint
from mtkd.tasks import build_tasks

MODELS = {"student": "random-init MobileNetV3", "student_pretrained": "ImageNet Lite0"}
ARMS = {"nokd": "no KD", "kd": "logit KD", "kdfeat": "logit + feature KD"}
SEEDS = (0, 1, 2)
LEVEL = 0.95


def metrics(run: Path, split: str) -> dict[str, float]:
    return json.loads((run / f"metrics_{split}.json").read_text())["metrics"]


def columns(dataset: Path) -> list[tuple[str, str, str]]:
    """(task, metric, direction) for each reported metric: every task's main metric, plus the
    joint DR+DME accuracy and the per-point distances where the run has them."""
    saved = read_checkpoint(dataset / "teacher" / "checkpoints" / "best.ckpt")
    tasks = build_tasks(saved["hyper_parameters"]["config"]["tasks"])
    test = metrics(dataset / "teacher", "test")
    cols = []
    for name, task in tasks.items():
        extra = [k.split("/")[2] for k in test if k.startswith(f"test/{name}/")]
        shown = [m for m in sorted(extra) if m.startswith("dist_px") or m == "auroc"]
        shown += ["acc"] if name == "dr_grade" and "acc" in extra else []
        for metric in [task.main_metric, *shown]:
            cols.append((name, metric, "max" if task.higher_is_better(metric) else "min"))
    cols += [(k.split("/")[1], "joint_acc", "max") for k in test if k.endswith("/joint_acc")]
    return list(dict.fromkeys(cols))


def best_variant(dataset: Path) -> str:
    saved = read_checkpoint(dataset / "teacher" / "checkpoints" / "best.ckpt")
    name, task = next(iter(build_tasks(saved["hyper_parameters"]["config"]["tasks"]).items()))
    key = f"val/{name}/{task.main_metric}"
    scores = {
        f"{model}/{arm}": metrics(dataset / model / arm / "seed0", "val")[key]
        for model in MODELS
        for arm in ("kd", "kdfeat")
    }
    pick = max if task.higher_is_better() else min
    return pick(scores, key=scores.__getitem__)


def mean_interval(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return f"{mean:.3f} ± {half:.3f}"


def table(dataset: Path) -> str:
    cols = columns(dataset)
    header = ["run", *(f"{t} {m}" for t, m, _ in cols)]
    rows = []

    def row(label: str, values: dict[str, float] | None) -> None:
        cells = [f"{values[f'test/{t}/{m}']:.3f}" if values else "-" for t, m, _ in cols]
        rows.append([label, *cells])

    row("teacher (Lite2, pretrained)", metrics(dataset / "teacher", "test"))
    for model, model_name in MODELS.items():
        for arm, arm_name in ARMS.items():
            run = dataset / model / arm / "seed0"
            done = (run / "metrics_test.json").is_file()
            row(f"{model_name}, {arm_name} (seed 0)", metrics(run, "test") if done else None)
    best = best_variant(dataset)
    model = best.split("/")[0]
    for arm in (best.split("/")[1], "nokd"):
        runs = [dataset / model / arm / f"seed{s}" for s in SEEDS]
        runs = [r for r in runs if (r / "metrics_test.json").is_file()]
        cells = [
            mean_interval([metrics(r, "test")[f"test/{t}/{m}"] for r in runs]) for t, m, _ in cols
        ]
        label = f"{MODELS[model]}, {ARMS[arm]}: mean ± {LEVEL:.0%} t-interval, {len(runs)} seeds"
        rows.append([label, *cells])
    for seed in SEEDS:
        report = dataset / "report" / f"seed{seed}" / "report.json"
        if not report.is_file():
            continue
        paired = json.loads(report.read_text())["bootstrap"]["paired"]["student - baseline"]
        cells = []
        for t, m, _ in cols:
            d = paired.get(f"{t}/{m}")
            cells.append(
                f"[{d['lo']:+.3f}, {d['hi']:+.3f}]{' *' if d['significant'] else ''}" if d else "-"
            )
        rows.append([f"KD - no KD, seed {seed}, paired {LEVEL:.0%} bootstrap", *cells])
    return (
        markdown_table(header, rows)
        + f"\n\nKD variant repeated over seeds (chosen on validation): {best}\n"
    )


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    print(best_variant(folder) if command == "best" else table(folder))
