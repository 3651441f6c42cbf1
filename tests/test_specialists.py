"""Specialist teachers: teachers with different task sets (and image sizes, normalisations,
preprocessing) teach one student; per-task fingerprint; uncovered tasks; renames."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules.datamodule import FundusDataModule
from mtkd.cli import main as cli_main
from mtkd.config import to_container
from mtkd.kd.cache import StaleCacheError
from mtkd.kd.ensemble import TeacherEnsemble, TeacherEntry, assign
from mtkd.kd.teacher_source import OnlineTeacher
from mtkd.modules.checkpoint import load_net
from mtkd.modules.student import StudentModule
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, fit, open_checked_cache
from mtkd.tasks import build_tasks
from tests.conftest import EXACT, distill_cfg, tiny_overrides

GRADING = ["dr_grade", "dme_risk", "glaucoma"]  # cdr: no teacher covers it
OTHERS = ["lesions", "anatomy", "landmarks"]
ALL = [*GRADING, "cdr", *OTHERS]


def drop(keep: list[str]) -> list[str]:
    return [f"~tasks.{n}" for n in ALL if n not in keep]


@pytest.fixture(scope="module")
def teachers(synth_root, tmp_path_factory) -> dict[str, str]:
    """A grading teacher at the student's geometry; a lesion/anatomy/landmark teacher at 96 px
    with [-1, 1] normalisation and CLAHE; a one-task teacher whose DR task is named ``grade``."""
    runs = {
        "grading": drop(GRADING),
        "others": [
            *drop(OTHERS),
            "data.image_size=96",
            "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.5,0.5,0.5]",
            "data.preprocess.clahe=true",
        ],
        "renamed": [
            *drop([]),
            "tasks.grade={kind: classification, num_classes: 5, ordinal: true, label: dr_grade}",
        ],
    }
    paths = {}
    for name, extra in runs.items():
        run = tmp_path_factory.mktemp(name)
        paths[name] = str(fit(load_config("teacher", [*tiny_overrides(synth_root, run), *extra])))
    return paths


def fixed_view_cfg(synth_root, run_dir, *extra):
    """A tiny distill config without augmentation, so cached and online teachers see one view."""
    return distill_cfg(synth_root, run_dir, "data.augment=[]", *extra)


def listed(*entries: str) -> str:
    return f"kd.teachers=[{','.join(entries)}]"


@pytest.mark.integration
def test_disjoint_teachers_teach_their_union_each_at_its_own_size_and_normalisation(
    synth_root, tmp_path, teachers, capsys
):
    args = [*tiny_overrides(synth_root, tmp_path), "data.augment=[]", *EXACT]
    code = cli_main(
        ["cache-teacher", f"teacher={teachers['grading']}", f"teacher={teachers['others']}", *args]
    )
    assert code == 0
    said = capsys.readouterr().err  # the command line's status messages
    assert re.search(r"cdr +<- no teacher: trained on labels only \(kd alpha 0\)", said)
    assert "data.preprocess.clahe=True, this run has False" in said
    cfg = fixed_view_cfg(synth_root, tmp_path, *EXACT)
    tasks = build_tasks(to_container(cfg)["tasks"])
    cache = open_checked_cache(cfg, tasks)
    assert sorted(cache.tasks) == sorted([*GRADING, *OTHERS])
    assert not (Path(cfg.kd.cache_dir) / "cdr.npy").exists()
    fp = cache.fingerprint
    assert fp["task_teachers"]["cdr"] == []
    assert {f["path"] for f in fp["task_teachers"]["lesions"]} == {teachers["others"]}
    # Every training image, labeled or not, has both teachers' outputs.
    dm = FundusDataModule(cfg.data, tasks)
    assert sorted(cache.rows) == sorted(s.sample_id for s in dm.split("train"))
    item = dm.dataset("train")[2]
    got = cache.get(item["sample_id"])
    # The grading teacher shares the run's geometry: its own outputs.
    grading = TeacherEnsemble([teachers["grading"]])(item["image"][None])
    for name in GRADING:
        assert np.allclose(got[name], grading[name][0].numpy(), atol=1e-5), name
    # The other teacher by hand: the run's normalisation -> its own, 64 -> 96 px, back to 64.
    net, own_tasks, own_cfg = load_net(teachers["others"])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.data.mean, cfg.data.std))
    pixels = item["image"][None] * std + mean
    bilinear = {"mode": "bilinear", "align_corners": False, "antialias": True}
    theirs = F.interpolate((pixels - 0.5) / 0.5, size=(96, 96), **bilinear)
    assert own_cfg.data.image_size == 96
    with torch.no_grad():
        raw = net(theirs)
    for name in ("lesions", "anatomy"):
        maps = F.interpolate(own_tasks[name].teacher_output(raw[name]), size=(64, 64), **bilinear)
        assert np.allclose(got[name], maps[0].numpy(), atol=1e-5), name
    points = own_tasks["landmarks"].teacher_output(raw["landmarks"])
    assert np.allclose(got["landmarks"], points[0].numpy(), atol=1e-5)


@pytest.mark.unit
def test_two_teachers_defining_a_task_differently_are_refused_with_both_definitions():
    five = build_tasks({"dr_grade": {"kind": "classification", "num_classes": 5}})
    three = build_tasks({"dr_grade": {"kind": "classification", "num_classes": 3}})
    entries = [TeacherEntry("a.ckpt"), TeacherEntry("b.ckpt")]
    with pytest.raises(
        ValueError,
        match=r"'dr_grade' is defined differently by teacher a.ckpt \(.*'num_classes': 5.*\) "
        r"and teacher b.ckpt \(.*'num_classes': 3",
    ):
        assign(entries, [five, three], None)
    # Taking the task from one of them resolves it; the other's is then not consulted.
    only_a = [TeacherEntry("a.ckpt"), TeacherEntry("b.ckpt", tasks=[])]
    sources, _ = assign(only_a, [five, three], five)
    assert sources == {"dr_grade": [(0, "dr_grade")]}
    with pytest.raises(ValueError, match="b.ckpt has no task \\['dme'\\]"):
        assign([TeacherEntry("b.ckpt", tasks=["dme"])], [three], None)


@pytest.mark.integration
def test_replacing_one_teacher_refuses_only_the_tasks_it_taught(synth_root, tmp_path, teachers):
    others = tmp_path / "others.ckpt"
    shutil.copy(teachers["others"], others)
    pair = listed(f"{{path: {teachers['grading']}}}", f"{{path: {others}}}")
    cfg = fixed_view_cfg(synth_root, tmp_path, pair)
    cache_teacher(cfg)
    tasks = build_tasks(to_container(cfg)["tasks"])
    open_checked_cache(cfg, tasks)
    ckpt = torch.load(others, weights_only=True)
    ckpt["epoch"] += 1  # "retrained": other bytes at the same path
    torch.save(ckpt, others)
    for run in (cfg, fixed_view_cfg(synth_root, tmp_path)):  # named by the run, or as recorded
        with pytest.raises(StaleCacheError) as refused:
            open_checked_cache(run, tasks)
        message = str(refused.value)
        assert f"teachers differs for tasks {sorted(OTHERS)}:" in message
        assert "mtkd cache-teacher" in message
        assert all(f"      {n}:" not in message for n in GRADING)


@pytest.mark.integration
def test_a_task_no_teacher_covers_trains_on_labels_only(synth_root, tmp_path, teachers, caplog):
    caplog.set_level(logging.INFO, logger="mtkd")
    pair = listed(f"{{path: {teachers['grading']}}}", f"{{path: {teachers['others']}}}")
    cfg = fixed_view_cfg(synth_root, tmp_path, pair)
    cache_teacher(cfg)
    student = StudentModule(to_container(cfg))
    cache = open_checked_cache(cfg, student.tasks)
    assert re.search("cdr +<- no teacher", caplog.text)  # said at distill start-up
    dm = FundusDataModule(cfg.data, student.tasks, teacher=cache)
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("train", train=True), batch_size=6)))
    assert "cdr" not in batch["teacher"]
    _, terms = student.step_losses(batch)
    assert ("cdr", "kd") not in terms and ("lesions", "kd") in terms
    assert terms["cdr", "loss"].item() == terms["cdr", "sup"].item() > 0
    a = student.alpha["lesions"]
    expected = (1 - a) * terms["lesions", "sup"] + a * terms["lesions", "kd"]
    assert terms["lesions", "loss"].item() == pytest.approx(expected.item())


@pytest.mark.integration
def test_online_equals_cached_for_a_specialist_pair(synth_root, tmp_path, teachers):
    pair = listed(f"{{path: {teachers['grading']}}}", f"{{path: {teachers['others']}}}")
    cfg = fixed_view_cfg(synth_root, tmp_path, pair, *EXACT)
    cache_teacher(cfg)
    student = StudentModule(to_container(cfg))
    dm = FundusDataModule(cfg.data, student.tasks, teacher=open_checked_cache(cfg, student.tasks))
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("train", train=True), batch_size=6)))
    _, cached = student.step_losses(batch)
    student.teacher_source = OnlineTeacher()
    student.cfg = fixed_view_cfg(synth_root, tmp_path, pair, "kd=online")
    student.setup("fit")
    _, online = student.step_losses(batch)
    kd_terms = sorted(k for k in online if k[1] == "kd")
    assert kd_terms == sorted((n, "kd") for n in [*GRADING, *OTHERS])
    for key in kd_terms:
        assert cached[key].item() == pytest.approx(online[key].item(), rel=1e-5, abs=1e-6), key


@pytest.mark.integration
def test_teachers_list_renames_and_selects_tasks(synth_root, tmp_path, teachers):
    entries = listed(
        f"{{path: {teachers['renamed']}, tasks: {{grade: dr_grade}}}}",
        f"{{path: {teachers['grading']}, tasks: [glaucoma]}}",
    )
    # The teacher's `grade` reads the dr_grade label, so the run's task must say so too.
    cfg = fixed_view_cfg(synth_root, tmp_path, entries, "tasks.dr_grade.label=dr_grade", *EXACT)
    cache_teacher(cfg)
    tasks = build_tasks(to_container(cfg)["tasks"])
    cache = open_checked_cache(cfg, tasks)
    assert sorted(cache.tasks) == ["dr_grade", "glaucoma"]
    taught = json.loads((Path(cfg.kd.cache_dir) / "fingerprint.json").read_text())["task_teachers"]
    assert [(f["path"], f["task"]) for f in taught["dr_grade"]] == [(teachers["renamed"], "grade")]
    assert [f["path"] for f in taught["glaucoma"]] == [teachers["grading"]]
    item = FundusDataModule(cfg.data, tasks).dataset("train")[0]
    grade = TeacherEnsemble([teachers["renamed"]])(item["image"][None])["grade"]
    assert np.allclose(cache.get(item["sample_id"])["dr_grade"], grade[0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="has no task \\['dr_grade'\\]"):
        cache_teacher(
            fixed_view_cfg(
                synth_root, tmp_path, listed(f"{{path: {teachers['renamed']}, tasks: [dr_grade]}}")
            )
        )
