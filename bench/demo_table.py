"""The README's demo table from the runs bench/demo_variants.sh leaves.

    python bench/demo_table.py runs/demo_variants demo   # the demo's KD student, every seed

One row per task (its main metric, ``Task.main_metric``): the teacher, the KD student and its no-KD
twin per seed, and the paired 95 % bootstrap interval of KD - no KD, all from each seed's
``mtkd report`` (report.json; "tie" where the interval spans 0); then each seed's verdict line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mtkd.commands.reporting import verdict_line
from mtkd.markdown import markdown_table
from mtkd.modules.checkpoint import read_checkpoint
from mtkd.tasks import build_tasks

ROLES = ("teacher", "student", "baseline")


def table(root: Path, variant: str) -> str:
    seeds = sorted(root.glob("seed*"), key=lambda d: int(d.name.removeprefix("seed")))
    saved = read_checkpoint(seeds[0] / "teacher" / "checkpoints" / "best.ckpt")
    tasks = build_tasks(saved["hyper_parameters"]["config"]["tasks"])
    reports = [json.loads((d / f"report_{variant}" / "report.json").read_text()) for d in seeds]
    names = " / ".join(d.name.removeprefix("seed") for d in seeds)
    header = [
        "task (main metric)",
        f"teacher, seeds {names}",
        "KD student",
        "no-KD student",
        f"KD − no KD [95 % paired], seed {names}",
    ]
    rows = []

    def value(report: dict, role: str, key: str) -> float:
        return report["runs"][role]["metrics"][key]

    for name, task in tasks.items():
        key = f"{name}/{task.main_metric}"
        cells = [" / ".join(f"{value(r, role, key):.3f}" for r in reports) for role in ROLES]
        diffs = []
        for r in reports:
            d = r["bootstrap"]["paired"]["student - baseline"][key]
            gap = value(r, "student", key) - value(r, "baseline", key)
            diffs.append(
                f"**{gap:+.3f}** [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d["significant"] else "tie"
            )
        rows.append([f"{name} ({task.main_metric})", *cells, " / ".join(diffs)])
    lines = [markdown_table(header, rows), ""]
    for seed, r in zip(seeds, reports):
        lines.append(f"    {seed.name}: {verdict_line(r['bootstrap']['verdict'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]), sys.argv[2]))
