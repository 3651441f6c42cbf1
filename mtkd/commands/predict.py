"""``mtkd predict``: a checkpoint run on photographs (mtkd.commands.prediction)."""

from __future__ import annotations

from mtkd.commands.args import Arg, Command, derived_spec, output_folder, parse_args

ARGS = derived_spec(
    {
        "ckpt": Arg("checkpoint to predict with", required="path/to/best.ckpt"),
        "images": Arg("an image file or a folder of images", required="image file or folder"),
        "out": output_folder("predictions"),
    }
)


def main(args: list[str]) -> None:
    from mtkd.commands.prediction import predict

    opts, rest = parse_args("predict", ARGS, args)
    predict(opts["ckpt"], opts["images"], opts["out"], rest)


COMMAND = Command(
    "predict", "predictions for images (ckpt=PATH images=FILE|DIR [out=DIR])", ARGS, main
)
