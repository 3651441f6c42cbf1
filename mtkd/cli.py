"""``mtkd <command> [key=value ...]`` — the same key=value overrides a W&B sweep passes."""

from __future__ import annotations

import os

# Before torch (and its OpenMP runtime, which reads this once) loads: with the default policy
# libgomp's idle threads spin, and with any other job on the cores a forward pass got 5-10x
# slower (bench/bench_threads.py --wait-policy). A policy the user set is left alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtkd.status import status_logger

log = status_logger(__name__)

USAGE = """usage: mtkd <command> [key=value ...]

commands:
  init           write a starter project folder          (DIR [force=true]: data and task
                 configs of your own, a README of the commands)
  synth          write the synthetic fundus dataset      (out=DIR n=600 image_size=256 seed=0)
  train-teacher  train the multi-task teacher            (teacher.yaml + overrides)
  cache-teacher  cache teacher outputs for distillation  (teacher=CKPT [teacher=CKPT2 ...], or
                 a kd.teachers list; teachers may be specialists with their own task sets)
  cache-check    hash every file of a teacher cache      (kd.cache_dir=DIR; distill's own open
                 checks sizes and headers only, or everything with cache.verify=full)
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
experiment=NAME[:SECTION] applies the recipe experiments/NAME.yaml (or a YAML path) over the
stage's defaults; the command line wins over it.
`mtkd <command> --help` lists a command's arguments.
"""


@dataclass(frozen=True)
class Arg:
    """One ``key=value`` argument of a command."""

    help: str
    default: Any = None
    #: converts the text; raises ValueError with what to give instead
    type: Callable[[str], Any] = str
    #: repeatable: the value is the list of every occurrence
    many: bool = False
    #: shown in the "needs key=<...>" error when the argument is required
    required: str | None = None


@dataclass(frozen=True)
class Spec:
    """A command's arguments. ``overrides``: what the other ``key=value`` items are (config
    overrides, passed on), or None to refuse them; ``positional``: the one bare argument."""

    args: dict[str, Arg]
    overrides: str | None = None
    positional: str | None = None

    def usage(self, command: str) -> str:
        lines = [f"usage: mtkd {command}" + (f" {self.positional}" if self.positional else "")]
        for name, arg in self.args.items():
            shown = str(arg.default).lower() if isinstance(arg.default, bool) else arg.default
            default = "" if arg.default is None else f" (default {shown})"
            default = " (required)" if arg.required else default
            lines.append(f"  {name}=...{' (repeatable)' if arg.many else ''}  {arg.help}{default}")
        if self.overrides:
            lines.append(f"  key=value ...  {self.overrides}")
        return "\n".join(lines)


def parse_args(command: str, spec: Spec, argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``argv`` into the spec's arguments (converted, defaults filled; the positional one
    under its name) and the rest (config overrides); unknown ones fail listing the valid ones."""
    values: dict[str, Any] = {n: [] if a.many else a.default for n, a in spec.args.items()}
    given: set[str] = set()
    rest = []  # in the given order: a removal ~a.b must follow what it removes
    for item in argv:
        key, eq, text = item.partition("=")
        arg = spec.args.get(key) if eq else None
        if arg is None:
            rest.append(item)
            continue
        if key in given and not arg.many:
            raise ValueError(f"{command}: {key}= given more than once")
        given.add(key)
        try:
            value = arg.type(text)
        except ValueError as exc:
            raise ValueError(f"{command}: {key}={text}: {exc}") from None
        if arg.many:
            values[key].append(value)
        else:
            values[key] = value
    valid = ", ".join(f"{n}=" for n in spec.args)
    if spec.positional:
        bare = [item for item in rest if "=" not in item]
        if len(bare) != 1:
            raise ValueError(
                f"{command} needs one {spec.positional}: mtkd {command} {spec.positional} "
                f"[{' '.join(f'{n}=...' for n in spec.args)}]"
            )
        values[spec.positional] = bare[0]
        rest.remove(bare[0])
    if spec.overrides is None and rest:
        raise ValueError(f"{command}: unknown arguments {rest}; valid: {valid}")
    missing = [f"{n}=<{a.required}>" for n, a in spec.args.items() if a.required and n not in given]
    if missing:
        raise ValueError(f"{command} needs {' '.join(missing)}")
    return values, rest


def whole_number(text: str) -> int:
    """An ``Arg.type``: a count >= 0."""
    if not text.isdigit():
        raise ValueError("give a whole number >= 0")
    return int(text)


def boolean(text: str) -> bool:
    """An ``Arg.type``: true or false."""
    if text not in ("true", "false"):
        raise ValueError("must be true or false")
    return text == "true"


#: the remaining items of a command that runs a stage
CONFIG_OVERRIDES = "config overrides: group=option or a.b=value (see `mtkd --help`)"

STAGE_ARGS = Spec({}, overrides=CONFIG_OVERRIDES)

SYNTH_ARGS = Spec(
    {
        "out": Arg("folder to write", "data/synthetic"),
        "n": Arg("number of images", 600, whole_number),
        "image_size": Arg("side of each image in pixels", 256, whole_number),
        "seed": Arg("random seed", 0, whole_number),
    }
)


def cmd_synth(args: list[str]) -> None:
    from data_modules.synthetic import synthetic_source

    opts, _ = parse_args("synth", SYNTH_ARGS, args)
    root = Path(opts["out"])
    samples = synthetic_source(root, n=opts["n"], image_size=opts["image_size"], seed=opts["seed"])
    log.info(f"synthetic dataset ready: {root / 'manifest.csv'} ({len(samples)} images)")


def cmd_train_teacher(args: list[str]) -> None:
    from mtkd.run_config import load_config
    from mtkd.stages import fit

    _, overrides = parse_args("train-teacher", STAGE_ARGS, args)
    fit(load_config("teacher", overrides))


def cmd_distill(args: list[str]) -> None:
    from mtkd.run_config import load_config
    from mtkd.stages import fit

    _, overrides = parse_args("distill", STAGE_ARGS, args)
    fit(load_config("distill", overrides))


CACHE_TEACHER_ARGS = Spec(
    {"teacher": Arg("a teacher checkpoint (added to a kd.teachers list)", many=True)},
    overrides=CONFIG_OVERRIDES,
)


def cmd_cache_teacher(args: list[str]) -> None:
    from mtkd.config import TeacherConfig
    from mtkd.run_config import load_config
    from mtkd.stages import cache_teacher

    opts, rest = parse_args("cache-teacher", CACHE_TEACHER_ARGS, args)
    teachers = opts["teacher"]
    if teachers:
        rest.append(f"cache.teacher=[{','.join(teachers)}]")
    cfg = load_config("distill", rest)
    if teachers and cfg.kd.teachers:  # teacher= adds whole teachers to the configured list
        cfg.kd.teachers.extend([TeacherConfig(path=t) for t in teachers])
    cache_teacher(cfg)


CACHE_CHECK_ARGS = Spec({"kd.cache_dir": Arg("the teacher cache to check", required="DIR")})


def cmd_cache_check(args: list[str]) -> None:
    """Hash every file of a cache against its checksums.json, one line per file as it passes:
    the check too slow to run at every open of a large cache. A failure raises, naming the file
    and the rebuild command (the CLI's exit code 2)."""
    from mtkd.kd.cache import checked_files, read_fingerprint

    opts, _ = parse_args("cache-check", CACHE_CHECK_ARGS, args)
    cache_dir = Path(opts["kd.cache_dir"])
    for name, record in checked_files(cache_dir, read_fingerprint(cache_dir), full=True):
        print(f"ok  {name}  {record['bytes']} bytes  sha256 {record['sha256'][:16]}", flush=True)
    print(f"teacher cache {cache_dir}: every file matches its checksum")


EVALUATE_ARGS = Spec(
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


def cmd_evaluate(args: list[str]) -> None:
    from mtkd.stages import evaluate

    opts, rest = parse_args("evaluate", EVALUATE_ARGS, args)
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


#: command -> ("module:function", "module:SPEC"); each function takes the ``key=value`` items.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("mtkd.cli:cmd_synth", "mtkd.cli:SYNTH_ARGS"),
    "train-teacher": ("mtkd.cli:cmd_train_teacher", "mtkd.cli:STAGE_ARGS"),
    "cache-teacher": ("mtkd.cli:cmd_cache_teacher", "mtkd.cli:CACHE_TEACHER_ARGS"),
    "cache-check": ("mtkd.cli:cmd_cache_check", "mtkd.cli:CACHE_CHECK_ARGS"),
    "distill": ("mtkd.cli:cmd_distill", "mtkd.cli:STAGE_ARGS"),
    "evaluate": ("mtkd.cli:cmd_evaluate", "mtkd.cli:EVALUATE_ARGS"),
    "init": ("mtkd.starter:main", "mtkd.starter:COMMAND_ARGS"),
    "demo": ("mtkd.demo:main", "mtkd.demo:COMMAND_ARGS"),
    "report": ("mtkd.report:main", "mtkd.report:COMMAND_ARGS"),
    "study": ("mtkd.study:main", "mtkd.study:COMMAND_ARGS"),
    "export": ("mtkd.export:main", "mtkd.export:COMMAND_ARGS"),
    "predict": ("mtkd.predict:main", "mtkd.predict:COMMAND_ARGS"),
    "sweep-local": ("mtkd.sweeps:main", "mtkd.sweeps:COMMAND_ARGS"),
}


def load(target: str) -> Any:
    """The object ``module:name`` names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def resolve(command: str) -> Callable[[list[str]], None]:
    return load(COMMANDS[command][0])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mtkd: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in args):
        print(load(COMMANDS[command][1]).usage(command))
        return 0
    args = [a.removeprefix("--") for a in args]
    try:
        with messages_to_stderr():
            resolve(command)(args)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"mtkd {command}: error: {explain(exc)}", file=sys.stderr)
        return 2
    return 0


#: the loggers whose status messages a command shows: the library's and its data modules'
MESSAGE_LOGGERS = ("mtkd", "data_modules")


@contextmanager
def messages_to_stderr() -> Iterator[None]:
    """During one command, write the status messages (INFO and above) as plain lines to stderr,
    keeping stdout for the tables and results asked for. A level set on a logger is kept; the
    loggers still propagate, and the root logger is left alone."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(name) for name in MESSAGE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


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
