"""``mtkd distill``: fit the student with KD from the distill config."""

from __future__ import annotations

from mtkd.commands.args import STAGE_ARGS, Command, parse_args


def main(args: list[str]) -> None:
    from mtkd.run_config import load_config
    from mtkd.stages import fit

    _, overrides = parse_args("distill", STAGE_ARGS, args)
    fit(load_config("distill", overrides))


COMMAND = Command(
    "distill", "train the student with KD (distill.yaml + overrides)", STAGE_ARGS, main
)
