"""``mtkd study``: the label-efficiency study, KD vs no KD per label fraction and seed (its
protocol and summary: mtkd.commands.study_runs)."""

from __future__ import annotations

from mtkd.commands.args import CONFIG_OVERRIDES, Arg, Command, Spec, parse_args

ARGS = Spec(
    {"study": Arg("a file of the study config group, or a YAML path", "label_efficiency")},
    overrides=f"study.KEY=VALUE items set the study's fields; the others are {CONFIG_OVERRIDES}",
)


def main(args: list[str]) -> None:
    from mtkd.commands.study_runs import load_study, run_study

    opts, rest = parse_args("study", ARGS, args)
    run_study(*load_study(opts["study"], rest))


COMMAND = Command(
    "study",
    "label-efficiency study: KD vs no KD per label fraction and seed ([study=label_efficiency] "
    "[study.KEY=VALUE ...] + stage overrides)",
    ARGS,
    main,
)
