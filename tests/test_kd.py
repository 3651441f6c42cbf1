"""Teacher-output cache and StudentModule: round trip, refusal of stale or half-written caches,
ensembles, augmentation consistency, cached == online, unlabeled samples get KD only."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkd.kd.cache import StaleCacheError, TeacherCache, merge_shards
from mtkd.kd.ensemble import TeacherEnsemble
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, fit, open_checked_cache
from tests.conftest import EXACT, distill_cfg, tiny_overrides

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teacher_ckpts(synth_root, tmp_path_factory) -> list[str]:
    """Two tiny teachers (different seeds), one epoch each."""
    paths = []
    for seed in (0, 1):
        run = tmp_path_factory.mktemp(f"teacher{seed}")
        paths.append(
            str(fit(load_config("teacher", tiny_overrides(synth_root, run, **{"run.seed": seed}))))
        )
    return paths


def build_cache(synth_root, run_dir, teachers, *extra):
    cfg = distill_cfg(synth_root, run_dir, f"cache.teacher=[{','.join(teachers)}]", *extra)
    cache_teacher(cfg)
    return cfg


def test_cache_round_trip_matches_teacher(synth_root, tmp_path, teacher_ckpts):
    cfg = build_cache(synth_root, tmp_path, teacher_ckpts[:1], *EXACT, "data.augment=[]")
    ensemble = TeacherEnsemble(teacher_ckpts[:1])
    from data_modules.datamodule import FundusDataModule

    dm = FundusDataModule(cfg.data, ensemble.tasks)
    train = dm.split("train")
    cache = TeacherCache(cfg.kd.cache_dir, ensemble.tasks)
    assert sorted(cache.rows) == sorted(s.sample_id for s in train)  # every sample exactly once
    ds = dm.dataset("train")
    for index in (0, len(ds) - 1):
        item = ds[index]
        expected = ensemble(item["image"][None])
        got = cache.get(item["sample_id"])
        for name, value in expected.items():
            assert np.allclose(got[name], value[0].numpy(), atol=1e-5), name
    assert cache.nbytes_per_sample()["dr_grade"] == 5 * 4
    assert cache.nbytes_per_sample()["lesions"] == 3 * 64 * 64 * 4


def test_default_storage_is_compact(synth_root, tmp_path, teacher_ckpts):
    cfg = build_cache(synth_root, tmp_path, teacher_ckpts[:1])
    cache = TeacherCache(cfg.kd.cache_dir, TeacherEnsemble(teacher_ckpts[:1]).tasks)
    sizes = cache.nbytes_per_sample()
    assert sizes["dr_grade"] == 5 * 2  # fp16 logits
    assert sizes["lesions"] == 3 * 64 * 64  # uint8 probabilities at the working size, 64 px
    assert sizes["landmarks"] == 2 * 2 * 4  # fp32 points
    arrays = cache._open()
    assert all(isinstance(a, np.memmap) for a in arrays.values())  # never loaded whole


def test_per_task_dense_size_is_stored_and_read_back_at_the_working_size(
    synth_root, tmp_path, teacher_ckpts
):
    """cache.task_dense_size stores one task's maps smaller; the others keep the default; the
    fingerprint records it and the loader brings the small maps back to the working size."""
    cfg = build_cache(
        synth_root, tmp_path, teacher_ckpts[:1], "cache.task_dense_size={anatomy: 16}"
    )
    tasks = TeacherEnsemble(teacher_ckpts[:1]).tasks
    cache = open_checked_cache(cfg, tasks)
    sizes = cache.nbytes_per_sample()
    assert (sizes["anatomy"], sizes["lesions"]) == (3 * 16 * 16, 3 * 64 * 64)
    storage = cache.fingerprint["storage"]
    assert (storage["dense_size"], storage["task_dense_size"]) == (64, {"anatomy": 16})
    from data_modules.datamodule import FundusDataModule

    item = FundusDataModule(cfg.data, tasks, teacher=cache).dataset("train", train=True)[0]
    assert tuple(item["teacher"]["anatomy"].shape) == (3, 64, 64)


def test_ensemble_averages_teachers(synth_root, tmp_path, teacher_ckpts):
    cfg = build_cache(synth_root, tmp_path, teacher_ckpts, *EXACT, "data.augment=[]")
    ens = TeacherEnsemble(teacher_ckpts)
    singles = [TeacherEnsemble([p]) for p in teacher_ckpts]
    cache = TeacherCache(cfg.kd.cache_dir, ens.tasks)
    assert len(cache.fingerprint["teachers"]) == 2
    from data_modules.datamodule import FundusDataModule

    item = FundusDataModule(cfg.data, ens.tasks).dataset("train")[0]
    outs = [s(item["image"][None]) for s in singles]
    got = cache.get(item["sample_id"])
    probs = (outs[0]["dr_grade"].softmax(1) + outs[1]["dr_grade"].softmax(1)) / 2
    assert np.allclose(np.exp(got["dr_grade"]), probs[0].numpy(), atol=1e-5)
    mean_pts = (outs[0]["landmarks"] + outs[1]["landmarks"]) / 2
    assert np.allclose(got["landmarks"], mean_pts[0].numpy(), atol=1e-6)


def test_distill_refuses_stale_cache_with_rebuild_command(synth_root, tmp_path, teacher_ckpts):
    cfg = build_cache(synth_root, tmp_path, teacher_ckpts[:1])
    changed = distill_cfg(synth_root, tmp_path, "data.image_size=96")
    with pytest.raises(StaleCacheError, match=r"preprocessing differs(.|\n)*mtkd cache-teacher"):
        open_checked_cache(changed, StudentTasks(changed))
    other_teacher = distill_cfg(synth_root, tmp_path, f"kd.teacher={teacher_ckpts[1]}")
    with pytest.raises(StaleCacheError, match="teachers differs"):
        open_checked_cache(other_teacher, StudentTasks(other_teacher))
    # Task weights and loss settings steer training only: the cache stays valid (sweeps reuse it).
    for loss_setting in (
        "tasks.dr_grade.weight=3",
        "tasks.lesions.pos_weight=[5,5,5]",
        "tasks.anatomy.dice_weight=0.5",
        "tasks.dr_grade.ordinal_weight=2",
        "tasks.landmarks.loss=mse",
    ):
        retuned = distill_cfg(synth_root, tmp_path, loss_setting)
        open_checked_cache(retuned, StudentTasks(retuned))
    # What the task outputs is part of the cache's identity.
    relabelled = distill_cfg(synth_root, tmp_path, "tasks.dr_grade.ordinal=false")
    with pytest.raises(StaleCacheError, match="tasks differs"):
        open_checked_cache(relabelled, StudentTasks(relabelled))
    same = distill_cfg(synth_root, tmp_path, f"kd.teacher={teacher_ckpts[0]}")
    assert open_checked_cache(same, StudentTasks(same)).fingerprint == json.loads(
        (Path(cfg.kd.cache_dir) / "fingerprint.json").read_text()
    )


def StudentTasks(cfg):  # noqa: N802  (reads like the task set it returns)
    from mtkd.tasks import build_tasks

    return build_tasks(dict(cfg.tasks))


def test_half_written_cache_is_never_read(synth_root, tmp_path, teacher_ckpts):
    cfg = build_cache(synth_root, tmp_path, teacher_ckpts[:1])
    cache_dir = Path(cfg.kd.cache_dir)
    tasks = StudentTasks(cfg)
    # A crash before the fingerprint is written: the reader refuses the folder.
    (cache_dir / "fingerprint.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        TeacherCache(cache_dir, tasks)
    # A merge that finds samples missing leaves no cache at the final name and no temp folder.
    shutil.rmtree(cache_dir)
    shards = tmp_path / "shards"
    shards.mkdir()
    fp = {
        "storage": {"dense_size": 32, "dense_dtype": "uint8", "logits_dtype": "float16", "views": 0}
    }
    with pytest.raises(RuntimeError, match="missing for 2 samples"):
        merge_shards(shards, cache_dir, tasks, fp, ["a", "b"])
    assert not cache_dir.exists()
    assert not [
        p for p in cache_dir.parent.iterdir() if p.name.startswith(f".{cache_dir.name}.tmp")
    ]


def test_teacher_task_the_run_lacks_is_ignored_and_a_differing_one_refused(
    synth_root, tmp_path, teacher_ckpts, caplog
):
    caplog.set_level(logging.INFO, logger="mtkd")
    cfg = distill_cfg(synth_root, tmp_path, f"cache.teacher=[{teacher_ckpts[0]}]", "~tasks.cdr")
    cache_teacher(cfg)
    assert "task 'cdr' is not a task of this run; ignored" in caplog.text
    assert not (Path(cfg.kd.cache_dir) / "cdr.npy").exists()
    other = distill_cfg(
        synth_root, tmp_path, f"cache.teacher=[{teacher_ckpts[0]}]", "tasks.dme_risk.num_classes=4"
    )
    with pytest.raises(
        ValueError, match="defines task 'dme_risk' as .*num_classes': 3.*num_classes': 4"
    ):
        cache_teacher(other)


def _student_batch(cfg, teacher):
    from data_modules.datamodule import FundusDataModule
    from mtkd.config import to_container
    from mtkd.modules.student import StudentModule

    student = StudentModule(to_container(cfg))
    dm = FundusDataModule(cfg.data, student.tasks, teacher=teacher)
    loader = torch.utils.data.DataLoader(dm.dataset("train", train=True), batch_size=6)
    return student, next(iter(loader))


def test_augmentation_moves_teacher_maps_and_points_with_the_image(
    synth_root, tmp_path, teacher_ckpts
):
    cfg = build_cache(synth_root, tmp_path, teacher_ckpts[:1], *EXACT, "data.augment=[]")
    tasks = StudentTasks(cfg)
    cache = open_checked_cache(cfg, tasks)
    from data_modules.datamodule import FundusDataModule

    plain = FundusDataModule(cfg.data, tasks, teacher=cache).dataset("train", train=True)[0]
    flip_cfg = distill_cfg(
        synth_root, tmp_path, *EXACT, "data.augment=[{name: HorizontalFlip, p: 1.0}]"
    )
    flipped = FundusDataModule(flip_cfg.data, tasks, teacher=cache).dataset("train", train=True)[0]
    assert torch.allclose(flipped["image"], plain["image"].flip(-1))
    for name in ("lesions", "anatomy"):
        assert torch.allclose(flipped["teacher"][name], plain["teacher"][name].flip(-1), atol=1e-6)
        assert torch.equal(flipped["targets"][name], plain["targets"][name].flip(-1))
    pts, flipped_pts = plain["teacher"]["landmarks"], flipped["teacher"]["landmarks"]
    assert torch.allclose(flipped_pts[:, 0], 1 - pts[:, 0], atol=1e-5)
    assert torch.allclose(flipped_pts[:, 1], pts[:, 1], atol=1e-5)
    assert torch.allclose(
        flipped["targets"]["landmarks"][:, 0], 1 - plain["targets"]["landmarks"][:, 0], atol=1e-5
    )
    # Non-spatial teacher outputs are untouched.
    assert torch.equal(flipped["teacher"]["dr_grade"], plain["teacher"]["dr_grade"])


def test_inconsistent_transform_is_refused_in_cached_mode():
    import albumentations as A
    from albumentations.core.type_definitions import Targets

    from data_modules.transforms import check_consistent

    class MaskOnlyWarp(A.DualTransform):
        _targets = (Targets.IMAGE, Targets.MASK)

    with pytest.raises(ValueError, match="MaskOnlyWarp cannot transform teacher keypoints"):
        check_consistent([MaskOnlyWarp(p=1.0)], {"mask", "keypoints"})
    check_consistent([MaskOnlyWarp(p=1.0), A.ColorJitter()], {"mask"})


@pytest.mark.parametrize(
    ("storage", "tolerance", "floor"),
    [(EXACT, 1e-5, 1e-6), ([], 1e-2, 2e-4)],
    ids=["fp32-cache", "default-fp16-uint8-cache"],
)
def test_cached_equals_online(synth_root, tmp_path, teacher_ckpts, storage, tolerance, floor):
    """Same deterministic view: cached KD loss equals online KD loss (fp32 to rounding: the
    cache was predicted in other batches; the default storage, uint8 maps at the working size
    and fp16 logits, within 1 % relative: quantisation only. The 32 px maps of the old default
    differed by 0.6-2.5 % on anatomy: they blurred thin vessels). ``floor`` is the absolute
    tolerance for terms near 0, where relative error means little."""
    cfg = build_cache(synth_root, tmp_path, teacher_ckpts[:1], *storage, "data.augment=[]")
    student, batch = _student_batch(cfg, open_checked_cache(cfg, StudentTasks(cfg)))
    torch.manual_seed(0)
    _, cached_terms = student.step_losses(batch)
    online_cfg = distill_cfg(
        synth_root, tmp_path, "kd=online", f"kd.teacher={teacher_ckpts[0]}", "data.augment=[]"
    )
    from mtkd.kd.teacher_source import OnlineTeacher

    student.teacher_source = OnlineTeacher()
    student.cfg = online_cfg
    student.setup("fit")
    _, online_terms = student.step_losses(batch)
    for key, online in online_terms.items():
        if key[1] == "kd":
            assert cached_terms[key].item() == pytest.approx(
                online.item(), rel=tolerance, abs=floor
            ), key


def test_unlabeled_samples_contribute_kd_only(synth_root, tmp_path, teacher_ckpts):
    cfg = build_cache(synth_root, tmp_path, teacher_ckpts[:1], "data.augment=[]")
    student, batch = _student_batch(cfg, open_checked_cache(cfg, StudentTasks(cfg)))
    for name in batch["has"]:
        batch["has"][name] = torch.zeros_like(batch["has"][name])
        batch["targets"][name] = (
            torch.full_like(batch["targets"][name], 1e6)
            if batch["targets"][name].is_floating_point()
            else batch["targets"][name]
        )
    total, terms = student.step_losses(batch)
    assert all(terms[n, "sup"].item() == 0.0 for n in student.tasks)
    assert all(terms[n, "kd"].item() > 0.0 for n in student.tasks if n != "landmarks")
    expected = sum(student.alpha[n] * terms[n, "kd"] for n in student.tasks)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.net.parameters() if p.grad is not None)


def test_exact_multi_view_mode_replays_the_teacher_view(synth_root, tmp_path, teacher_ckpts):
    aug = "data.augment=[{name: Affine, rotate: [-30, 30], p: 1.0}, {name: ColorJitter, p: 1.0}]"
    cfg = build_cache(synth_root, tmp_path, teacher_ckpts[:1], *EXACT, "cache.views=2", aug)
    tasks = StudentTasks(cfg)
    cache = open_checked_cache(cfg, tasks)
    assert cache.views == 2
    from data_modules.datamodule import FundusDataModule

    dataset = FundusDataModule(cfg.data, tasks, teacher=cache).dataset("train", train=True)
    ensemble = TeacherEnsemble(teacher_ckpts[:1])
    for view in (0, 1):
        dataset.view = view
        item = dataset[3]
        replayed = ensemble(item["image"][None])
        for name in ("dr_grade", "landmarks", "lesions"):
            assert np.allclose(
                item["teacher"][name].numpy(), replayed[name][0].numpy(), atol=1e-4
            ), (view, name)
    dataset.view = 0
    view0 = dataset[3]["image"]
    dataset.view = 1
    assert not torch.allclose(dataset[3]["image"], view0)  # two different augmented views
