"""Sweeps: every shipped W&B sweep YAML is valid for W&B and for this config, and
``mtkd sweep-local`` runs trials end to end, ranks them, records failures and continues."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from mtkd.cli import main as cli_main
from mtkd.commands.sweeps import Trial, load_sweep, propose, ranked, run_sweep, stage_args
from mtkd.config import BUILTIN_CONFIGS, GROUPS
from mtkd.models.multitask import MultiTaskNet, count_parameters
from mtkd.run_config import load_config
from mtkd.tasks import build_tasks

SWEEPS = sorted((BUILTIN_CONFIGS / "sweeps").glob("*.yaml"))
COMMAND = ["${env}", "${program}", "distill", "${args_no_hyphens}"]


def some_values(spec: dict[str, Any]) -> list[Any]:
    """Values a parameter can take: its list, its constant, or its range's ends."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def write_sweep(path: Path, **fields: Any) -> Path:
    sweep = {"program": "mtkd", "method": "grid", "command": COMMAND, **fields}
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.unit
def test_the_three_sweeps_ship() -> None:
    assert {p.stem for p in SWEEPS} >= {"kd_temperature_alpha", "task_weights", "student_encoder"}


@pytest.mark.unit
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_yaml_is_valid_for_wandb_and_for_the_config(path: Path) -> None:
    sweep = load_sweep(path)  # W&B's own schema plus what sweep-local needs
    stage, *fixed = stage_args(sweep)
    assert stage == "distill" and sweep["method"] in ("grid", "random", "bayes")
    assert sweep["method"] == "grid" or sweep["run_cap"] > 0  # random/bayes must end locally

    # the metric is one fit() logs for the configured tasks
    split, task, metric = sweep["metric"]["name"].split("/")
    cfg = load_config(stage, fixed)
    tasks = build_tasks(OmegaConf.to_container(cfg.tasks, resolve=True))
    assert split == "val" and metric in {"loss", *tasks[task].metrics().keys()}

    # every value of every parameter is a valid override, and a value lands where intended
    for key, spec in sweep["parameters"].items():
        for value in some_values(spec):
            cfg = load_config(stage, [*fixed, f"{key}={value}"])
            assert key in GROUPS or OmegaConf.select(cfg, key) == value, key


@pytest.mark.integration
def test_every_student_encoder_in_the_sweep_builds() -> None:
    sweep = load_sweep(BUILTIN_CONFIGS / "sweeps" / "student_encoder.yaml")
    cfg = load_config("distill")
    tasks = build_tasks(OmegaConf.to_container(cfg.tasks, resolve=True))
    image = torch.zeros(2, 3, 64, 64)
    sizes = {}
    for encoder in sweep["parameters"]["model.encoder"]["values"]:
        for channels in sweep["parameters"]["model.decoder_channels"]["values"]:
            model = OmegaConf.merge(cfg.model, {"encoder": encoder, "decoder_channels": channels})
            net = MultiTaskNet(tasks, model).eval()
            with torch.no_grad():
                out = net(image)
            assert set(out) == set(tasks), (encoder, channels)
            for name, value in out.items():  # every head answers for each image, finitely
                assert value.shape[0] == 2 and torch.isfinite(value).all(), (encoder, name)
            sizes[encoder, tuple(channels)] = count_parameters(net)
    # each encoder and each decoder width is really used: no two networks have the same size
    assert len(set(sizes.values())) == len(sizes), sizes


@pytest.mark.unit
def test_load_sweep_names_what_is_wrong(tmp_path: Path) -> None:
    bad = write_sweep(
        tmp_path / "bad.yaml",
        metric={"name": "val/loss", "goal": "lowest"},
        parameters={"optim.lr": {"values": [0.1]}},
        command=["${env}", "${program}", "${args_no_hyphens}"],
    )
    with pytest.raises(ValueError) as err:
        load_sweep(bad)
    assert "metric needs a name and goal" in str(err.value)
    assert "command must read" in str(err.value)


@pytest.mark.unit
def test_ranked_puts_the_best_first_and_failures_last() -> None:
    def trial(name: str, metric: float | None) -> Trial:
        return Trial(name, {}, "failed" if metric is None else "finished", metric, "", 0.0)

    trials = [trial("a", 0.2), trial("b", None), trial("c", 0.9), trial("d", math.nan)]
    assert [t.name for t in ranked(trials, "maximize")] == ["c", "a", "b", "d"]
    assert [t.name for t in ranked(trials, "minimize")] == ["a", "c", "b", "d"]


@pytest.mark.unit
def test_grid_proposals_skip_points_already_tried(tmp_path: Path) -> None:
    sweep = load_sweep(
        write_sweep(
            tmp_path / "g.yaml",
            metric={"name": "val/loss", "goal": "minimize"},
            parameters={"kd.alpha": {"values": [0.25, 0.5]}, "kd.temperature": {"values": [2.0]}},
        )
    )
    done = [Trial("trial-000", {"kd.alpha": 0.25, "kd.temperature": 2.0}, "failed", None, "", 0)]
    assert propose(sweep, done) == {"kd.alpha": 0.5, "kd.temperature": 2.0}
    done.append(Trial("trial-001", {"kd.alpha": 0.5, "kd.temperature": 2.0}, "finished", 1, "", 0))
    assert propose(sweep, done) is None


@pytest.mark.integration
def test_sweep_local_runs_two_trials_and_writes_a_ranked_table(
    tiny, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_sweep(
        tmp_path / "lr.yaml",
        name="lr",
        metric={"name": "val/loss", "goal": "minimize"},
        parameters={"optim.lr": {"values": [1e-6, 0.01]}},
    )
    extra = tiny(kd="none", **{"trainer.limit_train_batches": 2, "logger.log_images": False})
    assert cli_main(["sweep-local", f"sweep={path}", "count=2", *extra]) == 0

    sweep_dir = tmp_path / "runs" / "sweeps" / "lr"
    trials = json.loads((sweep_dir / "results.json").read_text())["trials"]
    losses = {
        t["name"]: json.loads((sweep_dir / t["name"] / "metrics_val.json").read_text())["metrics"][
            "val/loss"
        ]
        for t in trials
    }
    assert [t["state"] for t in trials] == ["finished", "finished"]
    assert [t["metric"] for t in trials] == sorted(losses.values())
    assert [t["metric"] for t in trials] == [losses[t["name"]] for t in trials]
    assert {t["params"]["optim.lr"] for t in trials} == {1e-6, 0.01}
    for t in trials:  # each trial logged offline to W&B in the sweep's group
        assert list((sweep_dir / t["name"] / "wandb").glob("offline-run-*"))

    table = (sweep_dir / "results.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[1] for row in rows] == [t["name"] for t in trials]
    assert "| rank | trial | optim.lr | val/loss | state | seconds |" in table
    assert rows[0] in capsys.readouterr().out


@pytest.mark.integration
def test_a_failing_trial_is_recorded_and_the_sweep_continues(tmp_path: Path) -> None:
    path = write_sweep(  # an unknown stage fails in a second, before torch is imported
        tmp_path / "broken.yaml",
        metric={"name": "val/loss", "goal": "minimize"},
        parameters={"optim.lr": {"values": [0.1]}},
        command=["${env}", "${program}", "no-such-stage", "${args_no_hyphens}"],
    )
    (trial,) = run_sweep(load_sweep(path), None, [], root=tmp_path)
    assert (trial.state, trial.metric) == ("failed", None)
    assert trial.error.startswith("exit 2")
    log = (tmp_path / "broken" / "trial-000" / "trial.log").read_text()
    assert "unknown command 'no-such-stage'" in log
    results = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert results["trials"][0]["state"] == "failed"
    assert run_sweep(load_sweep(path), None, [], root=tmp_path) == [trial]  # grid done: no rerun
