"""``mtkd sweep-local``: a W&B sweep YAML run with no W&B server (mtkd.commands.sweeps)."""

from __future__ import annotations

from mtkd.commands.args import CONFIG_OVERRIDES, Arg, Command, Spec, parse_args, whole_number

ARGS = Spec(
    {
        "sweep": Arg("the W&B sweep YAML", required="mtkd/configs/sweeps/<name>.yaml"),
        "count": Arg("trials to run (default: the whole grid)", type=whole_number),
    },
    overrides=f"{CONFIG_OVERRIDES}, applied to every trial",
)


def main(args: list[str]) -> None:
    """``mtkd sweep-local sweep=FILE [count=N] [key=value ...]`` (extra overrides go to every
    trial)."""
    from mtkd.commands.sweeps import SWEEPS_ROOT, load_sweep, results_markdown, run_sweep

    opts, rest = parse_args("sweep-local", ARGS, args)
    sweep = load_sweep(opts["sweep"])
    trials = run_sweep(sweep, opts["count"], rest)
    print("\n" + results_markdown(sweep, trials))
    print(f"results written to {SWEEPS_ROOT / sweep['name']}/results.md and results.json")


COMMAND = Command(
    "sweep-local",
    "run a W&B sweep YAML offline (sweep=mtkd/configs/sweeps/X.yaml)",
    ARGS,
    main,
)
