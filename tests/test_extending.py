"""Extension points used from files outside the library (``examples/extending/``), with no
library file edited: a task kind trains, distils, exports, predicts and appears in the W&B panel;
a KD loss is picked per task through ``kd.tasks.<task>.loss``."""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data_modules.manifest import read_manifest
from data_modules.preprocess import Preprocessor
from data_modules.transforms import build_transform
from mtkd.commands.exporting import export
from mtkd.commands.prediction import layer_colors, predict, prepare, spatial_layers
from mtkd.config import to_container
from mtkd.modules.checkpoint import load_net
from mtkd.modules.student import StudentModule
from mtkd.run_config import load_config
from mtkd.stages import fit
from mtkd.tasks import build_tasks, kd_loss_names
from mtkd.tracking.wandb_panels import ValidationPanels
from tests.conftest import PNG_MAGIC, REPO

EXAMPLES = REPO / "examples" / "extending"
BINARY = ["plugins=[binary_task]", "tasks.suspect={kind: binary, label: glaucoma}"]


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example plugin files importable, as a user's folder on PYTHONPATH would be."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def plugin(name: str):
    return importlib.import_module(name)


@pytest.mark.integration
def test_plugin_task_kind_trains_distils_exports_and_predicts(
    examples,
    tiny,
    synth_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mtkd")
    teacher_ckpt = fit(load_config("teacher", [*tiny(), *BINARY]))
    metrics = json.loads((teacher_ckpt.parent.parent / "metrics_val.json").read_text())["metrics"]
    assert {"val/suspect/auroc", "val/dr_grade/kappa"} <= set(metrics)
    # The same plugin task is distilled online, the teacher loading it through the checkpoint.
    student_dir = tmp_path / "student"
    student_cfg = load_config(
        "distill",
        [
            *tiny(**{"run.dir": str(student_dir)}),
            *BINARY,
            "kd=online",
            f"kd.teacher={teacher_ckpt}",
        ],
    )
    fit(student_cfg)
    student = json.loads((student_dir / "metrics_val.json").read_text())["metrics"]
    assert "val/suspect/auroc" in student
    # Distilled from the teacher, not trained on labels only (the start-up "teachers per task").
    assert f"  {'suspect':<14} <- {teacher_ckpt}\n" in caplog.text

    meta = json.loads((export(teacher_ckpt, tmp_path / "export") / "metadata.json").read_text())
    described = meta["tasks"]["suspect"]
    assert (described["kind"], described["activation"]) == ("binary", "sigmoid")
    assert described["names"] == ["glaucoma"] and described["shape"] == ["batch", 1]

    image = Path(read_manifest(synth_root)[0].image)
    payload = predict(teacher_ckpt, image, tmp_path / "predictions")
    (entry,) = payload["predictions"]
    got = entry["tasks"]["suspect"]["values"]["glaucoma"]
    # predict reports the sigmoid of the network's raw output on the preprocessed photograph.
    net, _, cfg = load_net(teacher_ckpt)
    pp = cfg.data.preprocess
    preprocessor = Preprocessor(cfg.data.image_size, pp.fov_crop, pp.clahe, pp.local_mean, None)
    prep, _ = prepare(preprocessor, image)
    batch = build_transform([], list(cfg.data.mean), list(cfg.data.std))(image=prep.image)["image"]
    with torch.inference_mode():
        raw = net(batch[None])["suspect"]
    assert got == pytest.approx(torch.sigmoid(raw).item(), abs=1e-6)
    assert f"{'suspect':<14} glaucoma={got:.3f}" in capsys.readouterr().out
    assert Path(entry["overlay"]).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.unit
def test_plugin_task_kind_appears_in_the_wandb_panel_and_overlays(examples) -> None:
    plugin("binary_task")
    tasks = build_tasks(
        {
            "suspect": {"kind": "binary", "label": "glaucoma"},
            "anatomy": {"kind": "segmentation", "classes": ["disc", "cup"]},
        }
    )
    panels = ValidationPanels(OmegaConf.create({"data": {"mean": [0] * 3, "std": [1] * 3}}), None)
    item = {
        "sample_id": "eye1",
        "image": torch.zeros(3, 4, 4),
        "has": {"suspect": torch.tensor(True), "anatomy": torch.tensor(False)},
        "targets": {"suspect": torch.tensor([1.0]), "anatomy": torch.zeros(2, 4, 4)},
    }
    anatomy = torch.zeros(1, 2, 4, 4)
    anatomy[0, 1, :2] = 0.9
    values = {"suspect": torch.tensor([[0.73]]), "anatomy": anatomy}
    image = panels.image(0, item, values, tasks)
    assert image._caption == "eye1; suspect glaucoma=0.73 (true 1)"
    assert list(image._masks) == ["anatomy predicted"]  # unlabeled: no "true" layer
    # predict's and the report's overlays: the plugin draws nothing, segmentation its masks.
    masks, points = spatial_layers(tasks, {n: v[0] for n, v in values.items()})
    assert sorted(masks) == ["cup", "disc"] and masks["cup"][:2].all() and not masks["disc"].any()
    assert points == {}
    assert list(layer_colors(tasks)[0]) == ["disc", "cup"]


@pytest.mark.unit
def test_plugin_kind_kd_loss_applies_temperature_squared(examples) -> None:
    plugin("binary_task")
    task = build_tasks({"suspect": {"kind": "binary", "label": "glaucoma"}}, {})["suspect"]
    pred, teacher, temperature = torch.tensor([[1.0]]), torch.tensor([[-1.0]]), 2.0
    q, x = 1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.5))  # sigmoid(-1 / 2), sigmoid(1 / 2)
    bce = -(q * math.log(x) + (1 - q) * math.log(1 - x))
    got = task.kd_loss(pred, teacher, temperature).item()
    assert got == pytest.approx(bce * temperature**2, rel=1e-6)


@pytest.mark.unit
def test_kd_loss_plugin_is_picked_per_task_through_the_config(examples) -> None:
    overrides = ["model=student", "plugins=[kd_loss]", "kd.tasks.dr_grade.loss=reverse_kl"]
    module = StudentModule(to_container(load_config("distill", overrides)))
    assert "reverse_kl" in kd_loss_names("classification")
    assert module.tasks["dr_grade"].kd_loss_name == "reverse_kl"
    assert module.tasks["dme_risk"].kd_loss_name == "kl"  # the other tasks keep their default
    student = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0]])
    temperature = module.temperature["dr_grade"]
    p_s = torch.softmax(student / temperature, dim=1)[0].tolist()
    p_t = torch.softmax(teacher / temperature, dim=1)[0].tolist()
    reverse = sum(s * math.log(s / t) for s, t in zip(p_s, p_t)) * temperature**2
    got = module.kd_losses({"dr_grade": student}, {"dr_grade": teacher})["dr_grade"]
    assert got.item() == pytest.approx(reverse, rel=1e-6)


@pytest.mark.unit
def test_unknown_kd_loss_or_key_lists_the_valid_ones(examples) -> None:
    unknown = r"kd.tasks.dr_grade.loss='nope' is unknown; choose one of: .*kl, reverse_kl \("
    with pytest.raises(ValueError, match=unknown):
        load_config("distill", ["plugins=[kd_loss]", "kd.tasks.dr_grade.loss=nope"])
    with pytest.raises(ValueError, match=r"kd.tasks.cdr: unknown keys \['los'\]; valid keys"):
        load_config("distill", ["kd.tasks.cdr.los=l1"])
