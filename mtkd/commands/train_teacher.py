"""``mtkd train-teacher``: fit the multi-task teacher from the teacher config."""

from __future__ import annotations

from mtkd.commands.args import STAGE_ARGS, Command, parse_args


def main(args: list[str]) -> None:
    from mtkd.run_config import load_config
    from mtkd.stages import fit

    _, overrides = parse_args("train-teacher", STAGE_ARGS, args)
    fit(load_config("teacher", overrides))


COMMAND = Command(
    "train-teacher", "train the multi-task teacher (teacher.yaml + overrides)", STAGE_ARGS, main
)
