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
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

from mtkd.commands.args import Command

#: the modules of mtkd.commands, each declaring one command, in the order ``mtkd --help`` lists
#: them; each imports its work only when run, so the table costs no torch import
COMMAND_MODULES = (
    "init",
    "synth",
    "train_teacher",
    "cache_teacher",
    "cache_check",
    "distill",
    "evaluate",
    "demo",
    "report",
    "study",
    "export",
    "predict",
    "sweep_local",
)

OVERRIDES_HELP = """overrides: group=option (data=, model=, tasks=, trainer=, logger=, kd=, profile=; option is a
name or a YAML file path) or a.b=value, e.g. `mtkd train-teacher trainer.max_epochs=5`.
config_dir=DIR (repeatable) searches DIR's groups before the built-in ones (also MTKD_CONFIG_PATH).
experiment=NAME[:SECTION] applies the recipe experiments/NAME.yaml (or a YAML path) over the
stage's defaults; the command line wins over it.
`mtkd <command> --help` lists a command's arguments.
"""


def command_table() -> dict[str, Command]:
    """CLI name -> its command, from the modules of ``COMMAND_MODULES``."""
    commands = [importlib.import_module(f"mtkd.commands.{m}").COMMAND for m in COMMAND_MODULES]
    return {command.name: command for command in commands}


def usage(commands: dict[str, Command]) -> str:
    """``mtkd --help``: one wrapped entry per command, then the overrides every stage takes."""
    entries = "\n".join(
        textwrap.fill(
            f"{name:<14} {command.summary}",
            width=97,
            initial_indent="  ",
            subsequent_indent=" " * 17,
            break_long_words=False,
        )
        for name, command in commands.items()
    )
    return f"usage: mtkd <command> [key=value ...]\n\ncommands:\n{entries}\n\n{OVERRIDES_HELP}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = command_table()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(commands))
        return 0
    command, args = argv[0], argv[1:]
    if command not in commands:
        print(f"mtkd: unknown command {command!r}\n\n{usage(commands)}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in args):
        print(commands[command].spec.usage(command))
        return 0
    args = [a.removeprefix("--") for a in args]
    try:
        with messages_to_stderr():
            commands[command].main(args)
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
