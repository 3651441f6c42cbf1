"""mtkd as a package outside this repository: the config search path (``config_dir=``,
``MTKD_CONFIG_PATH``, file paths as group options), ``mtkd init``, and the built wheel installed in
a fresh virtual environment running teacher -> cache -> student from an empty folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mtkd.cli import main
from mtkd.commands.init import write_starter
from mtkd.config import BUILTIN_CONFIGS, ConfigError
from mtkd.run_config import apply_overrides, load_config

REPO = Path(__file__).resolve().parent.parent


def user_folder(root: Path, **files: str) -> Path:
    """A config folder holding ``group/option.yaml`` files: ``user_folder(p, **{"logger/x": ...})``."""
    for name, text in files.items():
        path = root / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture(autouse=True)
def no_config_env(monkeypatch):
    monkeypatch.delenv("MTKD_CONFIG_PATH", raising=False)
    monkeypatch.delenv("MTKD_EXPERIMENTS", raising=False)


@pytest.mark.unit
def test_config_dir_adds_options_and_shadows_built_in_ones(tmp_path):
    mine = user_folder(
        tmp_path / "mine",
        **{
            "logger/quiet": "kind: none\n",
            "tasks/synthetic": "dr_grade: {kind: classification, num_classes: 5}\n",
        },
    )
    cfg = load_config("teacher", [f"config_dir={mine}", "logger=quiet"])
    assert cfg.logger.kind == "none"
    assert list(cfg.tasks) == ["dr_grade"]  # the user's tasks/synthetic.yaml wins
    assert "anatomy" in load_config("teacher").tasks  # without config_dir: the built-in one
    stage = user_folder(tmp_path / "stage", teacher="defaults: {data: synthetic, tasks: idrid}\n")
    assert "anatomy" not in load_config("teacher", [f"config_dir={stage}"]).tasks


@pytest.mark.unit
def test_config_dirs_are_searched_in_order_before_the_environment(tmp_path, monkeypatch):
    first = user_folder(tmp_path / "first", **{"logger/quiet": "kind: none\n"})
    second = user_folder(tmp_path / "second", **{"logger/quiet": "kind: csv\n"})
    env = user_folder(tmp_path / "env", **{"logger/quiet": "kind: wandb\n", "logger/env": ""})
    monkeypatch.setenv("MTKD_CONFIG_PATH", f"{env}{os.pathsep}{second}")
    over = [f"config_dir={first}", f"config_dir={second}"]
    assert load_config("teacher", [*over, "logger=quiet"]).logger.kind == "none"
    assert load_config("teacher", ["logger=quiet"]).logger.kind == "wandb"
    assert load_config("teacher", [*over, "logger=env"]).logger.kind == "csv"  # schema default
    monkeypatch.delenv("MTKD_CONFIG_PATH")
    monkeypatch.setenv("MTKD_EXPERIMENTS", str(second))  # the old name still works
    assert load_config("teacher", ["logger=quiet"]).logger.kind == "csv"


@pytest.mark.unit
def test_a_group_option_may_be_a_yaml_file(tmp_path, monkeypatch):
    (tmp_path / "quiet.yaml").write_text("kind: none\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("teacher", ["logger=./quiet.yaml"]).logger.kind == "none"
    assert load_config("teacher", [f"logger={tmp_path / 'quiet.yaml'}"]).logger.kind == "none"
    with pytest.raises(ConfigError, match=r"logger=./loud.yaml: no such file"):
        load_config("teacher", ["logger=./loud.yaml"])


@pytest.mark.unit
def test_an_unknown_option_lists_the_options_of_the_whole_path(tmp_path):
    mine = user_folder(tmp_path / "mine", **{"logger/quiet": "kind: none\n"})
    with pytest.raises(ConfigError, match=r"logger=loud: no such config in .*mine/logger") as err:
        load_config("teacher", [f"config_dir={mine}", "logger=loud"])
    assert "'quiet'" in str(err.value) and "'wandb_offline'" in str(err.value)
    with pytest.raises(ConfigError, match=r"config folder .*absent does not exist"):
        load_config("teacher", [f"config_dir={tmp_path / 'absent'}"])


@pytest.mark.unit
def test_a_saved_config_swaps_runtime_groups_from_the_search_path(tmp_path):
    mine = user_folder(tmp_path / "mine", **{"logger/quiet": "kind: none\n"})
    cfg = apply_overrides(load_config("teacher"), [f"config_dir={mine}", "logger=quiet"])
    assert cfg.logger.kind == "none"


@pytest.mark.unit
def test_init_writes_a_starter_project_and_refuses_a_non_empty_folder(tmp_path, capsys):
    project = tmp_path / "proj"
    assert main(["init", str(project)]) == 0
    assert {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()} == {
        "README.md",
        "data/my_data.yaml",
        "tasks/my_tasks.yaml",
    }
    readme = (project / "README.md").read_text()
    for stage in ("train-teacher", "cache-teacher", "distill"):
        assert f"mtkd {stage} config_dir={project} data=my_data tasks=my_tasks" in readme
    cfg = load_config("teacher", [f"config_dir={project}", "data=my_data", "tasks=my_tasks"])
    assert cfg.data.sources.mine.kind == "manifest"
    assert cfg.data.sources.mine.root == str(project / "dataset")

    (project / "README.md").write_text("my notes")
    (project / "keep.txt").write_text("mine")
    assert main(["init", str(project)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (project / "README.md").read_text() == "my notes"
    write_starter(project, force=True)
    assert "mtkd distill" in (project / "README.md").read_text()
    assert (project / "keep.txt").read_text() == "mine"


# -- the built wheel, outside the repository ------------------------------------------------------


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command; on failure show its output (the error is in there)."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv outside the repository with only the built wheel installed in it.

    The wheel is built from a copy of the sources (no build files left in the repository). The
    dependencies are reused from this venv through a .pth line written after the install: a path
    added that way does not run that folder's own .pth files, so the editable mtkd of this
    repository stays out of reach."""
    work = tmp_path_factory.mktemp("package")
    assert REPO not in work.parents
    src = work / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("mtkd", "data_modules"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work), "."], src, os.environ)
    (wheel,) = work.glob("mtkd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        f"mtkd/configs/{p.relative_to(BUILTIN_CONFIGS).as_posix()}"
        for p in BUILTIN_CONFIGS.rglob("*.yaml")
    }
    assert shipped <= names, f"configs missing from the wheel: {sorted(shipped - names)}"

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, os.environ)
    python = venv / "bin" / "python"
    run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        work,
        os.environ,
    )
    paths = sysconfig.get_paths()
    site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            work,
            os.environ,
        ).strip()
    )
    (site / "mtkd_test_deps.pth").write_text(
        "\n".join(sorted({paths["purelib"], paths["platlib"]})) + "\n"
    )
    return venv


@pytest.mark.package
def test_the_wheel_runs_teacher_cache_student_from_an_empty_folder(installed, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "MTKD_CONFIG_PATH", "MTKD_EXPERIMENTS")
    }
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    cwd, project = tmp_path / "empty", tmp_path / "project"
    cwd.mkdir()
    mtkd = str(installed / "bin" / "mtkd")

    where = run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "import mtkd, data_modules; print(mtkd.__file__, data_modules.__file__)",
        ],
        cwd,
        env,
    )
    for file in where.split():
        assert installed in Path(file).parents, f"{file} is not the installed package"

    run([mtkd, "init", str(project)], cwd, env)
    run([mtkd, "synth", f"out={project / 'dataset'}", "n=24", "image_size=64"], cwd, env)
    args = [
        f"config_dir={project}",
        "data=my_data",
        "tasks=my_tasks",
        "data.image_size=64",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "model=student",
        "logger=none",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    ]
    for stage in ("train-teacher", "cache-teacher", "distill"):
        run([mtkd, stage, *args], cwd, env)
    metrics = json.loads((cwd / "runs" / "student" / "metrics_val.json").read_text())["metrics"]
    assert any(k.startswith("val/vessels/") for k in metrics), sorted(metrics)
    assert (cwd / "runs" / "student" / "checkpoints" / "best.ckpt").is_file()
