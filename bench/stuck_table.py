"""The table of bench/stuck_heads.sh from the runs it leaves.

    python bench/stuck_table.py runs/stuck_heads

One row per run (student x seed): validation kappa of the DR and DME heads and Dice of the dense
tasks at the best checkpoint (``metrics_val.json``), and the tasks the run's stuck-head warning
named (its log). A global head counts as stuck at kappa <= 0.2, the issue's threshold; then the
count of runs with none stuck per student.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from mtkd.markdown import markdown_table

GRADING = ("dr_grade", "dme_risk")
DENSE = ("lesions", "anatomy")
THRESHOLD = 0.2
WARNED = re.compile(r"^task '(\w+)' after \d+ of \d+ epochs:", re.MULTILINE)


def row(run: Path) -> tuple[list[str], bool]:
    """The run's table row and whether none of its grading heads is stuck."""
    values = json.loads((run / "metrics_val.json").read_text())["metrics"]
    kappas = [values[f"val/{t}/kappa"] for t in GRADING]
    dice = [values[f"val/{t}/dice"] for t in DENSE]
    log = run.with_suffix(".log")
    warned = sorted(set(WARNED.findall(log.read_text()))) if log.is_file() else ["(no log)"]
    cells = [run.parent.name, run.name.removeprefix("seed")]
    cells += [f"{k:.3f}" + (" (stuck)" if k <= THRESHOLD else "") for k in kappas]
    cells += [f"{d:.3f}" for d in dice] + [", ".join(warned) or "none"]
    return cells, all(k > THRESHOLD for k in kappas)


def main(root: Path) -> None:
    rows, learning = [], {}
    for arm in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = [d for d in arm.glob("seed*") if d.is_dir()]  # seed<N>.log lies beside each
        runs.sort(key=lambda d: int(d.name.removeprefix("seed")))
        done = [r for r in runs if (r / "metrics_val.json").is_file()]
        for run in done:
            cells, ok = row(run)
            rows.append(cells)
            learning.setdefault(arm.name, []).append(ok)
    header = ["student", "seed", *(f"{t} kappa" for t in GRADING)]
    header += [f"{t} Dice" for t in DENSE] + ["stuck-head warnings"]
    print(markdown_table(header, rows))
    print()
    for arm, oks in learning.items():
        print(f"{arm}: DR and DME kappa > {THRESHOLD} in {sum(oks)} of {len(oks)} seeds")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
