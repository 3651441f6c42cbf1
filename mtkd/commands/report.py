"""``mtkd report``: did distillation pay off? (the tables, intervals and figures:
mtkd.commands.reporting)."""

from __future__ import annotations

from pathlib import Path

from mtkd.commands.args import Arg, Command, Spec, parse_args

#: role -> the run folder the step-by-step commands write
DEFAULT_RUNS = {
    "teacher": "runs/teacher",
    "student": "runs/student",
    "baseline": "runs/student_nokd",
}

ARGS = Spec(
    {
        **{role: Arg(f"the {role} run folder", default) for role, default in DEFAULT_RUNS.items()},
        "out": Arg("folder to write the report to", "runs/report"),
    }
)


def main(args: list[str]) -> None:
    from mtkd.commands.reporting import INTERVALS_NOTE, build_report

    opts, _ = parse_args("report", ARGS, args)
    runs: dict[str, str | Path] = {role: opts[role] for role in DEFAULT_RUNS}
    report = build_report(runs, opts["out"])
    print(f"\n{report.table}\n\n{INTERVALS_NOTE}\n\n{report.intervals}\n\n{report.verdict}")
    print(f"\n{report.efficiency}\n\nreport written to {report.path}")


COMMAND = Command(
    "report",
    "markdown + figures from evaluated runs (teacher=DIR student=DIR baseline=DIR out=DIR)",
    ARGS,
    main,
)
