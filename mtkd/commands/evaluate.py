"""``mtkd evaluate``: a checkpoint's metrics on a split, written beside its run."""

from __future__ import annotations

from mtkd.commands.args import Arg, Command, Spec, parse_args, whole_number

ARGS = Spec(
    {
        "ckpt": Arg("checkpoint to test", required="path/to/checkpoint.ckpt"),
        "split": Arg("val or test", "test"),
        "out": Arg("metrics JSON to write (default: beside the run)"),
        "resolution": Arg("working or original", "working"),
        "joint": Arg("classification tasks scored jointly (TASK,TASK or none)", many=True),
        "bootstrap": Arg("resamples for the 95 % intervals, 0: none", type=whole_number),
        "sources": Arg("score only these data sources' images (SOURCE,SOURCE)", many=True),
    },
    overrides="overrides of the checkpoint's config (trainer=, logger=, a.b=value)",
)


def main(args: list[str]) -> None:
    from mtkd.stages import evaluate

    opts, rest = parse_args("evaluate", ARGS, args)
    evaluate(
        opts["ckpt"],
        opts["split"],
        rest,
        opts["out"],
        opts["resolution"],
        opts["joint"] or None,
        opts["bootstrap"],
        opts["sources"] or None,
    )


COMMAND = Command(
    "evaluate",
    "test a checkpoint (ckpt=PATH split=test|val [out=FILE] [resolution=working|original] "
    "[joint=TASK,TASK ... | joint=none] [bootstrap=N resamples for the 95 % intervals, 0: none])",
    ARGS,
    main,
)
