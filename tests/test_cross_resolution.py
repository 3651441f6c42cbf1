"""Cross-resolution distillation: a student distilled at a lower working size than its teacher.
cache-teacher feeds the teacher the student's images resized to the teacher's own size, stores its
outputs at the student's size and says so at start-up; both checkpoints evaluate on the original
pixels, and the report times each at its own size."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules.datamodule import FundusDataModule
from mtkd.commands.reporting import build_report
from mtkd.kd.cache import TeacherCache
from mtkd.modules.checkpoint import load_net
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, evaluate, fit
from tests.conftest import STUDENT_DECODER, distill_cfg, tiny_overrides

pytestmark = pytest.mark.integration

TEACHER_SIZE, STUDENT_SIZE = 64, 48
#: EXACT's float32 storage, with dense maps at the default size (the student's working size)
FLOAT32 = ["cache.dense_dtype=float32", "cache.logits_dtype=float32"]


@pytest.fixture(scope="module")
def teacher(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher trained at 64 px (tiny_overrides' size), one epoch."""
    run = tmp_path_factory.mktemp("teacher64")
    overrides = tiny_overrides(synth_root, run, **{"data.image_size": TEACHER_SIZE})
    return fit(load_config("teacher", overrides))


def student_cfg(synth_root: Path, run_dir: Path, teacher: Path, *extra: str):
    return distill_cfg(
        synth_root,
        run_dir,
        f"cache.teacher=[{teacher}]",
        f"data.image_size={STUDENT_SIZE}",
        "data.augment=[]",
        *extra,
    )


def test_cache_holds_the_teachers_own_size_outputs_at_the_students_size(
    synth_root, tmp_path, teacher, caplog
):
    caplog.set_level(logging.INFO, logger="mtkd")
    cfg = student_cfg(synth_root, tmp_path, teacher, *FLOAT32)
    cache_teacher(cfg)
    assert (
        f"teacher {teacher}: fed {TEACHER_SIZE} px images (its own working size, resized from "
        f"the run's {STUDENT_SIZE} px); outputs brought back to {STUDENT_SIZE} px" in caplog.text
    )
    net, tasks, _ = load_net(teacher)
    cache = TeacherCache(cfg.kd.cache_dir, tasks)
    for name in ("lesions", "anatomy"):  # the maps: N x classes x size x size
        shape = np.load(Path(cfg.kd.cache_dir) / f"{name}.npy", mmap_mode="r").shape
        assert shape == (len(cache.rows), 3, STUDENT_SIZE, STUDENT_SIZE), name
    # By hand: the student's 48 px image enlarged to 64 px for the teacher (same normalisation),
    # its outputs brought back to 48 px.
    dataset = FundusDataModule(cfg.data, tasks).dataset("train")
    bilinear = {"mode": "bilinear", "align_corners": False, "antialias": True}
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        assert tuple(item["image"].shape[-2:]) == (STUDENT_SIZE, STUDENT_SIZE)
        with torch.no_grad():
            raw = net(F.interpolate(item["image"][None], size=(TEACHER_SIZE,) * 2, **bilinear))
        got = cache.get(item["sample_id"])
        for name in ("lesions", "anatomy"):
            maps = tasks[name].teacher_output(raw[name])
            maps = F.interpolate(maps, size=(STUDENT_SIZE,) * 2, **bilinear)
            assert np.allclose(got[name], maps[0].numpy(), atol=1e-5), name
        points = tasks["landmarks"].teacher_output(raw["landmarks"])
        assert np.allclose(got["landmarks"], points[0].numpy(), atol=1e-5)
        grade = raw["dr_grade"].log_softmax(dim=1)
        assert np.allclose(got["dr_grade"], grade[0].numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def student(synth_root: Path, tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Path:
    """A tiny student distilled at 48 px from the 64 px teacher's cache, one epoch."""
    run = tmp_path_factory.mktemp("student48")
    cfg = student_cfg(synth_root, run, teacher, f"model.decoder_channels={STUDENT_DECODER}")
    cache_teacher(cfg)
    return fit(cfg)


def test_both_evaluate_on_the_original_pixels(teacher, student):
    assert load_net(student)[2].data.image_size == STUDENT_SIZE
    for ckpt in (teacher, student):
        metrics = evaluate(str(ckpt), "test", [], resolution="original", bootstrap=0)
        assert (ckpt.parent.parent / "metrics_test_original.json").is_file()
        assert not math.isnan(metrics["test/anatomy/auroc_vessels"]), ckpt


def test_report_times_each_model_at_its_own_working_size(teacher, student, tmp_path):
    for ckpt in (teacher, student):
        evaluate(str(ckpt), "test", [], bootstrap=0)
    runs = {"teacher": teacher.parent.parent, "student": student.parent.parent}
    report = build_report(runs, tmp_path / "report", n_images=1, repeats=1)
    sizes = {role: profile["image_size"] for role, profile in report.data["profile"].items()}
    assert sizes == {"teacher": TEACHER_SIZE, "student": STUDENT_SIZE}
    header = report.efficiency.splitlines()[0]
    assert f"| teacher at {TEACHER_SIZE} px | student at {STUDENT_SIZE} px |" in header
