"""``mtkd init DIR [force=true]``: a starter project folder, so a user of the installed package
keeps their own configs outside mtkd: a data group (a manifest source), a task file and a README of
the commands, used with ``config_dir=DIR`` (see mtkd.config.search_path)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mtkd.commands.args import Arg, Command, Spec, boolean, parse_args
from mtkd.status import status_logger

log = status_logger(__name__)

DATA = """\
# Your images: a manifest folder (manifest.csv + images; format: mtkd's README, "Manifest format").
# The path is absolute so the commands work from any folder; edit it if you move the data.
sources:
  mine: {{kind: manifest, root: {root}}}
image_size: 96
# stratify_on: dr_grade  # a label to balance the carved train/val/test splits on
augment:
  - {{name: HorizontalFlip, p: 0.5}}
"""

TASKS = """\
# One entry per task, reading the manifest's columns: label:dr_grade, mask:vessels, ...
# Task kinds and their options: mtkd's README ("Extending with a task head") and docs/extending.md.
dr_grade: {kind: classification, num_classes: 5, ordinal: true}
vessels: {kind: segmentation, classes: [vessels]}
"""

README = """\
# An mtkd project

`{config_dir}` puts this folder first on mtkd's config search path, so its groups add to the
built-in ones (`MTKD_CONFIG_PATH={quoted}` does the same for every command):

    data/my_data.yaml    your images: the manifest folder {dataset}
    tasks/my_tasks.yaml  the tasks to learn, each reading manifest columns

Put manifest.csv and the images in {dataset}, or try synthetic ones first:
`mtkd synth {synth} n=120`. Then, from any folder (runs go to ./runs):

    mtkd train-teacher {args}
    mtkd cache-teacher {args}
    mtkd distill {args}

and `mtkd evaluate ckpt=runs/student/checkpoints/best.ckpt` for the student's test metrics.
"""


def write_starter(root: Path, force: bool = False) -> list[Path]:
    """Write the starter files under ``root``; refuse a non-empty folder unless ``force``
    (which rewrites only the starter files). -> the files written."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; give a new or empty folder")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise ValueError(
            f"{root} is not empty; give a new folder, or force=true to rewrite its "
            "starter files (data/my_data.yaml, tasks/my_tasks.yaml, README.md)"
        )
    root = root.resolve()
    dataset = root / "dataset"
    config_dir = shlex.quote(f"config_dir={root}")
    args = f"{config_dir} data=my_data tasks=my_tasks"
    synth = shlex.quote(f"out={dataset}")
    files = {
        root / "data" / "my_data.yaml": DATA.format(root=json.dumps(str(dataset))),
        root / "tasks" / "my_tasks.yaml": TASKS,
        root / "README.md": README.format(
            config_dir=config_dir,
            quoted=shlex.quote(str(root)),
            dataset=dataset,
            synth=synth,
            args=args,
        ),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)


ARGS = Spec(
    {"force": Arg("true: overwrite the files of an existing folder", False, boolean)},
    positional="DIR",
)


def main(args: list[str]) -> None:
    """``mtkd init DIR [force=true]``."""
    opts, _ = parse_args("init", ARGS, args)
    files = write_starter(Path(opts["DIR"]), opts["force"])
    log.info(f"starter project written: {', '.join(str(f) for f in files)}\nnext: {files[-1]}")


COMMAND = Command(
    "init",
    "write a starter project folder (DIR [force=true]: data and task configs of your own, a "
    "README of the commands)",
    ARGS,
    main,
)
