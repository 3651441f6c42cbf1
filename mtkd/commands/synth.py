"""``mtkd synth``: the synthetic fundus dataset, to try the pipeline without data of one's own."""

from __future__ import annotations

from pathlib import Path

from mtkd.commands.args import Arg, Command, Spec, parse_args, whole_number
from mtkd.status import status_logger

log = status_logger(__name__)

ARGS = Spec(
    {
        "out": Arg("folder to write", "data/synthetic"),
        "n": Arg("number of images", 600, whole_number),
        "image_size": Arg("side of each image in pixels", 256, whole_number),
        "seed": Arg("random seed", 0, whole_number),
    }
)


def main(args: list[str]) -> None:
    from data_modules.synthetic import synthetic_source

    opts, _ = parse_args("synth", ARGS, args)
    root = Path(opts["out"])
    samples = synthetic_source(root, n=opts["n"], image_size=opts["image_size"], seed=opts["seed"])
    log.info(f"synthetic dataset ready: {root / 'manifest.csv'} ({len(samples)} images)")


COMMAND = Command(
    "synth",
    "write the synthetic fundus dataset (out=DIR n=600 image_size=256 seed=0)",
    ARGS,
    main,
)
