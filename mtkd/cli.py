"""``mtkd <command> [key=value ...]`` — the same key=value overrides a W&B sweep passes."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

USAGE = """usage: mtkd <command> [key=value ...]

commands:
  init           write a starter project folder          (DIR [force=true]: data and task
                 configs of your own, a README of the commands)
  synth          write the synthetic fundus dataset      (out=DIR n=600 image_size=256 seed=0)
  train-teacher  train the multi-task teacher            (teacher.yaml + overrides)
  cache-teacher  cache teacher outputs for distillation  (teacher=CKPT [teacher=CKPT2 ...], or
                 a kd.teachers list; teachers may be specialists with their own task sets)
  distill        train the student with KD               (distill.yaml + overrides)
  evaluate       test a checkpoint                       (ckpt=PATH split=test|val [out=FILE]
                 [resolution=working|original] [joint=TASK,TASK ... | joint=none]
                 [bootstrap=N resamples for the 95 % intervals, 0: none])
  demo           teacher, cache, student, no-KD baseline, evaluation, report  ([runs=DIR] + overrides)
  report         markdown + figures from evaluated runs  (teacher=DIR student=DIR baseline=DIR out=DIR)
  study          label-efficiency study: KD vs no KD per label fraction and seed
                 ([study=label_efficiency] [study.KEY=VALUE ...] + stage overrides)
  export         student-only weights, ONNX and metadata  (ckpt=PATH [out=DIR])
  predict        predictions for images                  (ckpt=PATH images=FILE|DIR [out=DIR])
  sweep-local    run a W&B sweep YAML offline             (sweep=mtkd/configs/sweeps/X.yaml)

overrides: group=option (data=, model=, tasks=, trainer=, logger=, kd=, profile=; option is a
name or a YAML file path) or a.b=value, e.g. `mtkd train-teacher trainer.max_epochs=5`.
config_dir=DIR (repeatable) searches DIR's groups before the built-in ones (also MTKD_CONFIG_PATH).
"""


def _take(
    args: list[str], key: str, many: bool = False
) -> tuple[list[str] | str | None, list[str]]:
    """Split ``key=value`` command arguments from config overrides."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    rest = [a for a in args if not a.startswith(f"{key}=")]
    if many:
        return values, rest
    if len(values) > 1:
        raise ValueError(f"{key}= given more than once")
    return (values[0] if values else None), rest


def cmd_synth(args: list[str]) -> None:
    from data_modules.synthetic import synthetic_source

    opts = dict(a.split("=", 1) for a in args)
    unknown = set(opts) - {"out", "n", "image_size", "seed"}
    if unknown:
        raise ValueError(
            f"synth: unknown arguments {sorted(unknown)}; valid: out, n, image_size, seed"
        )
    root = Path(opts.get("out", "data/synthetic"))
    samples = synthetic_source(
        root,
        n=int(opts.get("n", 600)),
        image_size=int(opts.get("image_size", 256)),
        seed=int(opts.get("seed", 0)),
    )
    print(f"synthetic dataset ready: {root / 'manifest.csv'} ({len(samples)} images)")


def cmd_train_teacher(args: list[str]) -> None:
    from mtkd.config import load_config
    from mtkd.stages import fit

    fit(load_config("teacher", args))


def cmd_distill(args: list[str]) -> None:
    from mtkd.config import load_config
    from mtkd.stages import fit

    fit(load_config("distill", args))


def cmd_cache_teacher(args: list[str]) -> None:
    from mtkd.config import TeacherConfig, load_config
    from mtkd.stages import cache_teacher

    teachers, rest = _take(args, "teacher", many=True)
    if teachers:
        rest.append(f"cache.teacher=[{','.join(teachers)}]")
    cfg = load_config("distill", rest)
    if teachers and cfg.kd.teachers:  # teacher= adds whole teachers to the configured list
        cfg.kd.teachers.extend([TeacherConfig(path=t) for t in teachers])
    cache_teacher(cfg)


def cmd_evaluate(args: list[str]) -> None:
    from mtkd.stages import evaluate

    ckpt, rest = _take(args, "ckpt")
    split, rest = _take(rest, "split")
    out, rest = _take(rest, "out")
    resolution, rest = _take(rest, "resolution")
    joint, rest = _take(rest, "joint", many=True)
    bootstrap, rest = _take(rest, "bootstrap")
    if not ckpt:
        raise ValueError("evaluate needs ckpt=<path/to/checkpoint.ckpt>")
    if bootstrap is not None and not bootstrap.isdigit():
        raise ValueError(f"bootstrap={bootstrap}: give a whole number of resamples (0: none)")
    resamples = None if bootstrap is None else int(bootstrap)
    evaluate(ckpt, split or "test", rest, out, resolution or "working", joint or None, resamples)


#: command -> "module:function"; each function takes the remaining ``key=value`` arguments.
COMMANDS: dict[str, str] = {
    "synth": "mtkd.cli:cmd_synth",
    "train-teacher": "mtkd.cli:cmd_train_teacher",
    "cache-teacher": "mtkd.cli:cmd_cache_teacher",
    "distill": "mtkd.cli:cmd_distill",
    "evaluate": "mtkd.cli:cmd_evaluate",
    "init": "mtkd.starter:main",
    "demo": "mtkd.demo:main",
    "report": "mtkd.report:main",
    "study": "mtkd.study:main",
    "export": "mtkd.export:main",
    "predict": "mtkd.predict:main",
    "sweep-local": "mtkd.sweeps:main",
}


def resolve(command: str) -> Callable[[list[str]], None]:
    module, _, name = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mtkd: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    args = [a.removeprefix("--") for a in args]
    try:
        resolve(command)(args)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"mtkd {command}: error: {explain(exc)}", file=sys.stderr)
        return 2
    return 0


#: set to 1 for the full traceback instead of the one-line message
DEBUG_ENV = "MTKD_DEBUG"


def explain(exc: Exception) -> str:
    """A failure as the message a user can act on: mtkd's own errors already name the fix;
    others get the fix for their kind, or the debug flag."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, MisconfigurationException):
        return f"Lightning refused the run: {text} (check the trainer.* settings)"
    if isinstance(exc, OSError) and exc.errno is not None:  # from the system, not from mtkd
        return (
            f"{text}. Check that the path exists, is a folder you can write to where one is "
            "written, and that the disk has space"
        )
    if isinstance(exc, (ValueError, LookupError, RuntimeError, ArithmeticError, OSError)):
        return text  # mtkd's own messages, raised with the fix
    return (
        f"unexpected {type(exc).__name__}: {text}. Rerun with {DEBUG_ENV}=1 for the traceback "
        "and report it"
    )


if __name__ == "__main__":
    sys.exit(main())
