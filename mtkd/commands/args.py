"""The ``key=value`` arguments of the commands, declared once per command (``Spec``) and parsed
here, and ``Command``: how each module of mtkd.commands declares itself to ``mtkd.cli``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
    overrides, passed on), or None to refuse them; ``override_prefix``: the one config key
    they may set (``derived.``), others refused before any work; ``positional``: the one bare
    argument."""

    args: dict[str, Arg]
    overrides: str | None = None
    positional: str | None = None
    override_prefix: str = ""

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
    unknown = (
        rest
        if spec.overrides is None
        else [r for r in rest if not r.startswith(spec.override_prefix)]
    )
    if unknown:
        allowed = f", {spec.override_prefix}<...>=" if spec.overrides is not None else ""
        raise ValueError(f"{command}: unknown arguments {unknown}; valid: {valid}{allowed}")
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


def output_folder(name: str) -> Arg:
    """The ``out=`` of a command that writes ``name`` files for a checkpoint, by default beside
    its run (``mtkd.outputs.default_output``)."""
    return Arg(
        f"folder to write (default: {name}/ beside the run, <stem>_{name}/ beside a checkpoint "
        "outside a run)"
    )


#: the remaining items of a command that runs a stage
CONFIG_OVERRIDES = "config overrides: group=option or a.b=value (see `mtkd --help`)"


#: the arguments of a command that runs one stage from its config: overrides only
STAGE_ARGS = Spec({}, overrides=CONFIG_OVERRIDES)


@dataclass(frozen=True)
class Command:
    """One ``mtkd <name>`` command, declared by its module as ``COMMAND``: the CLI builds its
    command table and ``mtkd --help`` from these, so a command module must import nothing heavy
    at load (the work's imports go inside ``main``)."""

    name: str
    #: its line of ``mtkd --help``: what it does, then its main arguments in parentheses
    summary: str
    spec: Spec
    #: takes the ``key=value`` items after the command name
    main: Callable[[list[str]], None]


def derived_spec(args: dict[str, Arg]) -> Spec:
    """The arguments of a command that reads a checkpoint's derived measures (predict, export):
    ``args`` and ``derived.<name>=`` overrides, no other."""
    return Spec(
        args,
        overrides="derived.<name>={measure: ..., <input>: <task>.<layer>} measures to add",
        override_prefix="derived.",
    )
