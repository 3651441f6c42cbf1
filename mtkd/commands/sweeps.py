"""``mtkd sweep-local sweep=FILE [count=N] [key=value ...]``: run a W&B sweep YAML
(``mtkd/configs/sweeps/*.yaml``) with no W&B server.

W&B's own sweep engine (the ``sweeps`` package the W&B server runs) proposes each trial from the
trials so far (grid, random or bayes). Each trial is a clean ``mtkd <stage>`` subprocess, so
DDP works, that logs offline to ``runs/sweeps/<sweep>/<trial>``; its metric is read from the
trial's ``metrics_val.json``. Results accumulate in ``runs/sweeps/<sweep>/results.{json,md}``:
running the same sweep again continues it (a grid skips the points already tried).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sweeps
import yaml

from data_modules.io import atomic_write_bytes
from mtkd.config import ConfigError, key_problem, yaml_error
from mtkd.markdown import markdown_table
from mtkd.status import status_logger

log = status_logger(__name__)

#: the W&B macros that must surround the stage arguments in a sweep's ``command``
PROGRAM, ARGS = "${program}", "${args_no_hyphens}"
#: where local sweeps write their trials and results
SWEEPS_ROOT = Path("runs/sweeps")


@dataclass
class Trial:
    """One finished or failed trial of a local sweep."""

    name: str
    params: dict[str, Any]
    state: str  # "finished" or "failed"
    metric: float | None
    run_dir: str
    seconds: float
    error: str | None = None


def engine_config(sweep: dict[str, Any]) -> dict[str, Any]:
    """The sweep without ``run_cap``: a W&B server key that the local engine's schema does not
    know in every ``sweeps`` release (0.2.0 rejects it; sweep-local enforces it itself)."""
    return {k: v for k, v in sweep.items() if k != "run_cap"}


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Parse a sweep YAML and refuse what neither W&B nor sweep-local can run."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sweep file {file} does not exist; see mtkd/configs/sweeps/")
    text = file.read_text()
    try:
        sweep = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise yaml_error(file, exc) from None
    if not isinstance(sweep, dict):
        raise ConfigError(
            f"sweep {file} holds a {type(sweep).__name__}, not a mapping of program, method, "
            "metric, parameters and command"
        )
    problems = parameter_problems(sweep.get("parameters"), key_lines(yaml.compose(text)))
    if not problems:  # the engine raises, naming no file, on a parameter that is no mapping
        problems = list(sweeps.schema_violations_from_proposed_config(engine_config(sweep)))
    for key in ("program", "method", "metric", "parameters", "command"):
        if key not in sweep:
            problems.append(f"missing {key!r}")
    if sweep.get("program") != "mtkd":
        problems.append("program must be mtkd")
    metric = sweep.get("metric") or {}
    if not metric.get("name") or metric.get("goal") not in ("maximize", "minimize"):
        problems.append("metric needs a name and goal: maximize|minimize")
    command = [str(c) for c in sweep.get("command") or []]
    if (
        PROGRAM not in command
        or ARGS not in command
        or command.index(ARGS) <= command.index(PROGRAM) + 1
    ):
        problems.append(f"command must read [${{env}}, {PROGRAM}, <stage>, ..., {ARGS}]")
    if problems:
        raise ConfigError(f"sweep {file}: " + "; ".join(problems))
    sweep.setdefault("name", file.stem)
    return sweep


def key_lines(node: yaml.Node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """The line (from 1) of every mapping key of a composed YAML document, by its key path."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            lines[path] = key.start_mark.line + 1
            lines.update(key_lines(value, path))
    return lines


def parameter_problems(parameters: Any, lines: dict[tuple[str, ...], int]) -> list[str]:
    """What is wrong with a sweep's ``parameters``, each at its line: not a mapping, a
    parameter whose spec is no mapping, or a name that is no config key (every trial would
    fail on it)."""
    if parameters is None:
        return []
    if not isinstance(parameters, dict):
        return [f"line {lines[('parameters',)]}: parameters must map config keys to specs"]
    problems = []
    for name, spec in parameters.items():
        where = f"line {lines[('parameters', str(name))]}: parameter {name}"
        problem = key_problem(str(name))
        if problem:
            problems.append(f"{where} is not a config key: {problem}")
        if not isinstance(spec, dict):
            problems.append(f"{where} needs a mapping such as {{values: [...]}}, not {spec!r}")
    return problems


def stage_args(sweep: dict[str, Any]) -> list[str]:
    """The literal arguments between ``${program}`` and ``${args_no_hyphens}``: the stage,
    then any fixed overrides."""
    command = [str(c) for c in sweep["command"]]
    return command[command.index(PROGRAM) + 1 : command.index(ARGS)]


def propose(sweep: dict[str, Any], trials: list[Trial]) -> dict[str, Any] | None:
    """The next parameters from W&B's engine given the trials so far; None when a grid is done."""
    metric = sweep["metric"]["name"]
    runs = [
        sweeps.SweepRun(
            name=t.name,
            state=sweeps.RunState.finished if t.state == "finished" else sweeps.RunState.failed,
            config={k: {"value": v} for k, v in t.params.items()},
            summary_metrics={} if t.metric is None else {metric: t.metric},
        )
        for t in trials
    ]
    run = sweeps.next_run(engine_config(sweep), runs)
    return None if run is None else {k: v["value"] for k, v in run.config.items()}


def run_trial(
    sweep: dict[str, Any], params: dict[str, Any], extra: list[str], run_dir: Path
) -> Trial:
    """Run one trial as ``mtkd <stage> <params> <extra> logger=wandb_offline ...``; a failure
    (non-zero exit, missing metric) is recorded in the Trial, never raised."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mtkd.cli",
        *stage_args(sweep),
        *(f"{k}={v}" for k, v in params.items()),
        *extra,
        "logger=wandb_offline",
        f"logger.group={sweep['name']}",
        f"run.dir={run_dir}",
        # The trial's folder is the sweep's own: a trial killed before its result was recorded
        # is run again from the start (the engine may propose other values for it).
        "run.overwrite=true",
    ]
    log = run_dir / "trial.log"
    start = time.monotonic()
    with log.open("w") as out:
        out.write(" ".join(command) + "\n\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = round(time.monotonic() - start, 1)
    metric = sweep["metric"]["name"]
    results = run_dir / "metrics_val.json"
    if code != 0:
        error = f"exit {code}, see {log}"
    elif not results.is_file() or metric not in json.loads(results.read_text())["metrics"]:
        error = f"{results} has no {metric}"
    else:
        value = float(json.loads(results.read_text())["metrics"][metric])
        return Trial(run_dir.name, params, "finished", value, str(run_dir), seconds)
    return Trial(run_dir.name, params, "failed", None, str(run_dir), seconds, error)


def ranked(trials: list[Trial], goal: str) -> list[Trial]:
    """Best first by the sweep metric; failed and NaN trials last, in trial order."""
    scored = [t for t in trials if t.metric is not None and math.isfinite(t.metric)]
    scored.sort(key=lambda t: t.metric, reverse=goal == "maximize")
    return scored + [t for t in trials if t not in scored]


def results_markdown(sweep: dict[str, Any], trials: list[Trial]) -> str:
    """A markdown table of the trials, best first."""
    metric, goal = sweep["metric"]["name"], sweep["metric"]["goal"]
    names = list(sweep["parameters"])
    rows = []
    for rank, t in enumerate(ranked(trials, goal), 1):
        value = "" if t.metric is None else f"{t.metric:.4f}"
        state = t.state if t.error is None else f"{t.state}: {t.error}"
        params = [t.params.get(n, "") for n in names]
        rows.append([rank, t.name, *params, value, state, t.seconds])
    header = ["rank", "trial", *names, metric, "state", "seconds"]
    return f"# Sweep {sweep['name']}: {metric} ({goal})\n\n{markdown_table(header, rows)}\n"


def write_results(sweep: dict[str, Any], trials: list[Trial], sweep_dir: Path) -> None:
    """results.json (every trial, best first) and results.md beside the trials."""
    ordered = ranked(trials, sweep["metric"]["goal"])
    payload = {
        "sweep": sweep["name"],
        "metric": sweep["metric"],
        "trials": [asdict(t) for t in ordered],
    }
    atomic_write_bytes(sweep_dir / "results.json", json.dumps(payload, indent=1).encode())
    atomic_write_bytes(sweep_dir / "results.md", results_markdown(sweep, trials).encode())


def run_sweep(
    sweep: dict[str, Any], count: int | None, extra: list[str], root: Path = SWEEPS_ROOT
) -> list[Trial]:
    """Propose and run up to ``count`` new trials (default: the sweep's ``run_cap``, or every
    grid point); returns every trial of the sweep so far, best first."""
    count = count if count is not None else sweep.get("run_cap")
    if count is None and sweep["method"] != "grid":
        raise ValueError(f"a {sweep['method']} sweep never ends: pass count=N or set run_cap")
    sweep_dir = root / sweep["name"]
    previous = sweep_dir / "results.json"
    trials = (
        [Trial(**t) for t in json.loads(previous.read_text())["trials"]]
        if previous.is_file()
        else []
    )
    trials.sort(key=lambda t: t.name)
    new = 0
    while count is None or new < count:
        params = propose(sweep, trials)
        if params is None:
            break
        name = f"trial-{len(trials):03d}"
        log.info(f"[{sweep['name']}] {name}: " + " ".join(f"{k}={v}" for k, v in params.items()))
        trial = run_trial(sweep, params, extra, sweep_dir / name)
        outcome = f"{trial.metric}" if trial.error is None else f"failed ({trial.error})"
        log.info(
            f"[{sweep['name']}] {name}: {sweep['metric']['name']} = {outcome} ({trial.seconds} s)"
        )
        trials.append(trial)
        new += 1
        write_results(sweep, trials, sweep_dir)
    return ranked(trials, sweep["metric"]["goal"])
