"""The experiment recipes of experiments/: each composes for its stages, the command line wins over
it, lookups and mistakes are named, and the docs cite every recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mtkd import run_config
from mtkd.config import BUILTIN_CONFIGS, STAGE_COMMANDS, ConfigError
from mtkd.run_config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    """experiment=NAME is looked up in the working directory's experiments/. What a task learns
    from the data (a text task's vocabulary: tests/test_text_task.py) is left out: these tests
    compose configs, and reading the data would generate the 600-image synthetic set here."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(run_config, "learn_task_specs", lambda cfg: None)


def uses(file: Path) -> list[tuple[str, str]]:
    """(stage, experiment= value) for every way the file is meant to be used: each section for
    its stage, or the whole file for its stage (every stage when it names none)."""
    spec = yaml.safe_load(file.read_text())
    sections = spec.get("sections") or {}
    if not sections:
        return [(s, file.stem) for s in ([spec["stage"]] if "stage" in spec else STAGE_COMMANDS)]
    return [(part.get("stage", name), f"{file.stem}:{name}") for name, part in sections.items()]


@pytest.mark.parametrize(
    "stage, choice", [u for f in EXPERIMENTS for u in uses(f)], ids=lambda v: str(v)
)
def test_every_experiment_composes_for_its_stages_and_is_recorded(stage, choice):
    cfg = load_config(stage, [f"experiment={choice}"])
    assert cfg.stage == stage and cfg.experiment == choice


@pytest.mark.parametrize("file", EXPERIMENTS, ids=lambda f: f.name)
def test_every_experiment_names_its_command_and_the_files_it_runs_exist(file):
    command = yaml.safe_load(file.read_text()).get("command")
    assert isinstance(command, str) and command.strip(), f"{file.name} has no command"
    named = re.findall(r"[\w./-]+\.(?:yaml|sh)\b", command)
    named += [f"mtkd/configs/study/{s}.yaml" for s in re.findall(r"\bstudy=(\w+)", command)]
    missing = [n for n in named if not (REPO / n).is_file()]
    assert not missing, f"{file.name}: command names missing files {missing}"


def test_the_experiment_applies_its_groups_and_values_and_the_command_line_wins():
    cfg = load_config("distill", ["experiment=retinamnist:student_pretrained"])
    assert cfg.data.sources.keys() == {"retinamnist"}  # its data group
    assert cfg.model.encoder == "timm-tf_efficientnet_lite0"  # its section's model group
    assert (cfg.optim.lr, cfg.optim.encoder_lr_mult) == (0.002, 0.25)  # section values
    assert (cfg.data.image_size, cfg.run.monitor) == (128, "val/dr_grade/auroc")  # top level
    assert cfg.trainer.max_epochs == 20  # over trainer/cpu.yaml's 12

    over = load_config(
        "distill",
        ["experiment=retinamnist:student_pretrained", "optim.lr=0.01", "model=student"],
    )
    assert over.optim.lr == 0.01  # a command-line value beats the experiment's
    assert over.model.encoder == "tu-mobilenetv3_small_100"  # and a command-line group choice
    assert over.optim.encoder_lr_mult == 0.25  # what the command line leaves is the experiment's


def test_a_section_named_after_the_stage_is_the_default():
    assert load_config("teacher", ["experiment=idrid"]).trainer.max_epochs == 8


def test_an_unknown_experiment_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"experiment=nope: no such config in .*experiments") as e:
        load_config("teacher", ["experiment=nope"])
    assert all(f"'{f.stem}'" in str(e.value) for f in EXPERIMENTS)


@pytest.mark.parametrize(
    "stage, overrides, message",
    [
        ("distill", ["experiment=retinamnist"], r"has no distill section; pick one of \[.*student"),
        ("teacher", ["experiment=retinamnist:student"], r"for the distill stage, not teacher"),
        ("distill", ["experiment=idrid:studnet"], r"no section 'studnet'; its sections are"),
        ("teacher", ["experiment=demo", "experiment=idrid"], r"experiment= given 2 times"),
    ],
)
def test_experiment_mistakes_are_named(stage, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(stage, overrides)


def test_a_config_dir_experiment_or_a_file_path_is_found_and_its_mistakes_name_the_file(tmp_path):
    mine = tmp_path / "experiments" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("defaults: {model: student_pretrained}\ndata: {image_size: 64}\n")
    by_name = load_config("distill", [f"config_dir={tmp_path}", "experiment=mine"])
    by_path = load_config("distill", [f"experiment={mine}"])
    for cfg in (by_name, by_path):
        assert (cfg.model.encoder, cfg.data.image_size) == ("timm-tf_efficientnet_lite0", 64)
    mine.write_text("data: {imag_size: 64}\n")
    with pytest.raises(ConfigError, match=rf"experiment=mine \({mine}\): .*imag_size"):
        load_config("distill", [f"config_dir={tmp_path}", "experiment=mine"])
    mine.write_text("defaults: {modle: student}\n")
    with pytest.raises(ConfigError, match=r"defaults names \['modle'\], which are not groups"):
        load_config("distill", [f"experiment={mine}"])


def test_a_saved_config_refuses_an_experiment():
    saved = OmegaConf.load(BUILTIN_CONFIGS / "distill.yaml")  # any config: refused before use
    with pytest.raises(ConfigError, match="experiment= composes a new run"):
        apply_overrides(saved, ["experiment=demo"])


def test_the_docs_cite_every_experiment_and_only_existing_ones():
    text = "\n".join(d.read_text() for d in DOCS)
    cited = set(re.findall(r"experiments/([a-z0-9_]+)\.yaml", text))  # not the NAME placeholder
    names = {f.stem for f in EXPERIMENTS}
    assert cited <= names, f"cited but missing: {sorted(cited - names)}"
    assert names <= cited, f"no doc cites {sorted(names - cited)}"
