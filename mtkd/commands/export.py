"""``mtkd export``: the deployable student (the files it writes: mtkd.commands.exporting)."""

from __future__ import annotations

from mtkd.commands.args import Arg, Command, derived_spec, output_folder, parse_args

ARGS = derived_spec(
    {
        "ckpt": Arg("checkpoint to export", required="path/to/student best.ckpt"),
        "out": output_folder("export"),
    }
)


def main(args: list[str]) -> None:
    from mtkd.commands.exporting import export

    opts, rest = parse_args("export", ARGS, args)
    export(opts["ckpt"], opts["out"], rest)


COMMAND = Command(
    "export", "student-only weights, ONNX and metadata (ckpt=PATH [out=DIR])", ARGS, main
)
