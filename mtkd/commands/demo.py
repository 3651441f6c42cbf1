"""``mtkd demo``: the whole pipeline on the synthetic data in one process (the stages and what
the demo's runs are: mtkd.commands.demo_runs)."""

from __future__ import annotations

import time

from mtkd.commands.args import CONFIG_OVERRIDES, Arg, Command, Spec, parse_args

ARGS = Spec(
    {"runs": Arg("folder of the demo's runs", "runs")},
    overrides=f"{CONFIG_OVERRIDES}, applied to every stage",
)


def main(args: list[str]) -> None:
    from mtkd.commands.demo_runs import run_demo
    from mtkd.commands.reporting import INTERVALS_NOTE

    opts, overrides = parse_args("demo", ARGS, args)
    start = time.perf_counter()
    report, timings = run_demo(overrides, opts["runs"])
    total = time.perf_counter() - start
    print(f"\n{'=' * 72}\n== demo: test metrics (* = each task's main metric)\n{'=' * 72}")
    print(report.table)
    print(f"\n{INTERVALS_NOTE}\n\n{report.intervals}\n\n{report.verdict}")
    print(f"\n{report.efficiency}\n\nwall time per stage:")
    for title, seconds in timings.items():
        print(f"  {title:<52} {seconds:7.1f} s")
    print(f"  {'total':<52} {total:7.1f} s")
    print(f"\nreport: {report.path} (figures beside it)")


COMMAND = Command(
    "demo",
    "teacher, cache, student, no-KD baseline, evaluation, report ([runs=DIR] + overrides)",
    ARGS,
    main,
)
