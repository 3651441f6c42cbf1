"""The declarative argument layer of the commands: one spec per command, parsed by
``mtkd.commands.args.parse_args``; unknown keys fail listing the valid ones; ``--help`` lists them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtkd import cli
from mtkd.commands.args import Arg, Spec, boolean, parse_args, whole_number

pytestmark = pytest.mark.unit

SPEC = Spec(
    {
        "ckpt": Arg("checkpoint", required="path.ckpt"),
        "count": Arg("how many", 3, whole_number),
        "tag": Arg("repeatable", many=True),
    }
)


def test_values_are_converted_defaults_filled_and_repeats_collected():
    opts, rest = parse_args("x", SPEC, ["ckpt=a.ckpt", "tag=t1", "tag=t2"])
    assert opts == {"ckpt": "a.ckpt", "count": 3, "tag": ["t1", "t2"]} and rest == []
    opts, _ = parse_args("x", SPEC, ["count=7", "ckpt=b"])
    assert opts["count"] == 7


def test_unknown_keys_fail_with_the_valid_ones_listed():
    with pytest.raises(
        ValueError, match=r"x: unknown arguments \['bogus=1'\]; valid: ckpt=, count=, tag="
    ):
        parse_args("x", SPEC, ["ckpt=a", "bogus=1"])


def test_other_items_are_overrides_when_the_command_takes_them():
    spec = Spec(SPEC.args, overrides="config overrides")
    opts, rest = parse_args("x", spec, ["ckpt=a", "trainer.max_epochs=2", "~tasks.cdr"])
    assert opts["ckpt"] == "a" and rest == ["trainer.max_epochs=2", "~tasks.cdr"]


def test_missing_repeated_and_badly_typed_arguments_are_refused():
    with pytest.raises(ValueError, match=r"x needs ckpt=<path.ckpt>"):
        parse_args("x", SPEC, [])
    with pytest.raises(ValueError, match="ckpt= given more than once"):
        parse_args("x", SPEC, ["ckpt=a", "ckpt=b"])
    with pytest.raises(ValueError, match="count=-2: give a whole number >= 0"):
        parse_args("x", SPEC, ["ckpt=a", "count=-2"])


def test_positional_argument():
    spec = Spec({"force": Arg("overwrite", False, boolean)}, positional="DIR")
    assert parse_args("init", spec, ["here", "force=true"])[0] == {"DIR": "here", "force": True}
    with pytest.raises(ValueError, match="init needs one DIR"):
        parse_args("init", spec, ["force=true"])


@pytest.mark.parametrize("command", sorted(cli.command_table()))
def test_every_command_lists_its_arguments_on_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    printed = capsys.readouterr().out
    spec = cli.command_table()[command].spec
    assert printed.startswith(f"usage: mtkd {command}")
    for name in spec.args:
        assert f"  {name}=" in printed, name


def test_an_unknown_key_of_a_command_fails_before_any_work(capsys):
    assert cli.main(["synth", "size=3"]) == 2
    assert "valid: out=, n=, image_size=, seed=" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_loads_no_torch(argv):
    """The command table is the command modules' declarations; their work, and torch with it,
    is imported only when a command runs."""
    code = f"import sys; from mtkd.cli import main; main({argv!r}); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "False"
    assert "usage: mtkd" in done.stdout


def test_the_table_lists_every_command_module_by_its_declared_name():
    table = cli.command_table()
    assert list(table)[:3] == ["init", "synth", "train-teacher"]
    assert len(table) == len(cli.COMMAND_MODULES)
    assert all(name == command.name for name, command in table.items())
    assert "  sweep-local    run a W&B sweep YAML offline" in cli.usage(table)
