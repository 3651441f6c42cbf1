"""``data=combined``: IDRiD (official layout, tiny generated copy) + synthetic + an unlabeled
folder in one run. Each sample carries only its source's labels; unlabeled images feed KD only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.datamodule import FundusDataModule, load_samples
from mtkd.kd.cache import TeacherCache
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, fit, open_checked_cache
from mtkd.tasks import build_tasks

pytestmark = pytest.mark.integration

B = "B. Disease Grading"
C = "C. Localization"
#: IDRiD-shaped photographs: wider than high, the FOV disc clipped at the top and bottom
WIDTH, HEIGHT = 96, 64
#: split -> (image count, letter, name) of IDRiD's sets; test names restart at IDRiD_001
IDRID_SETS = {"train": (6, "a", "Training"), "test": (2, "b", "Testing")}
UNLABELED_IMAGES = 4
#: the tasks (of tasks=synthetic) each source labels
IDRID_TASKS = {"dr_grade", "dme_risk", "landmarks"}


def fundus(path: Path, seed: int) -> None:
    """A small JPEG: a reddish, noisy disc in a black frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    inside = (xx - WIDTH / 2) ** 2 + (yy - HEIGHT / 2) ** 2 <= (0.4 * WIDTH) ** 2
    pixels = rng.integers(0, 60, (HEIGHT, WIDTH, 3)) + np.array([150, 70, 30])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(inside[..., None], pixels, 0).astype(np.uint8)).save(path)


def csv(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


def write_idrid(root: Path) -> None:
    """IDRiD parts B and C as released (folder and file names, CSV headers) at 96x64 px."""
    for count, letter, tag in IDRID_SETS.values():
        names = [f"IDRiD_{i:03d}" for i in range(1, count + 1)]
        for i, name in enumerate(names):
            photo = root / B / "1. Original Images" / f"{letter}. {tag} Set" / f"{name}.jpg"
            fundus(photo, seed=i + 10 * count)
        csv(
            root / B / "2. Groundtruths" / f"{letter}. IDRiD_Disease Grading_{tag} Labels.csv",
            "Image name,Retinopathy grade,Risk of macular edema ",
            [f"{name},{i % 5},{i % 3}" for i, name in enumerate(names)],
        )
        for folder, (prefix, x) in {
            "1. Optic Disc Center Location": (f"{letter}. IDRiD_OD_Center", 70),
            "2. Fovea Center Location": ("IDRiD_Fovea_Center", 45),
        }.items():
            csv(
                root / C / "2. Groundtruths" / folder / f"{prefix}_{tag} Set_Markups.csv",
                "Image No,X- Coordinate,Y - Coordinate",
                [f"{name},{x + i},{30 + i}" for i, name in enumerate(names)],
            )


@pytest.fixture
def combined(tiny, tmp_path: Path):
    """``overrides(**extra)`` for a tiny data=combined run in this test's tmp dir."""
    write_idrid(tmp_path / "idrid")
    for i in range(UNLABELED_IMAGES):
        fundus(tmp_path / "clinic" / f"visit{i}.jpg", seed=100 + i)

    def overrides(**extra: object) -> list[str]:
        return [
            "data=combined",
            *tiny(**extra),
            f"data.sources.idrid.root={tmp_path / 'idrid'}",
            f"data.sources.unlabeled.root={tmp_path / 'clinic'}",
        ]

    return overrides


def source_of(sample_id: str) -> str:
    return sample_id.split("/")[0] if "/" in sample_id else "synthetic"


def expected_has(source: str, task: str) -> bool:
    return {"idrid": task in IDRID_TASKS, "synthetic": True, "unlabeled": False}[source]


def test_partial_labels_train_a_teacher_and_distil_a_student(combined, tmp_path: Path):
    teacher_cfg = load_config("teacher", combined())
    assert set(teacher_cfg.tasks) > IDRID_TASKS  # lesions, anatomy, ...: synthetic only
    teacher = fit(teacher_cfg)

    cache_teacher(load_config("distill", combined(**{"cache.teacher": f"[{teacher}]"})))
    student_cfg = load_config(
        "distill", combined(**{"run.dir": tmp_path / "student", "kd.teacher": teacher})
    )
    tasks = build_tasks(dict(student_cfg.tasks))
    cache = open_checked_cache(student_cfg, tasks)
    dm = FundusDataModule(student_cfg.data, tasks, teacher=cache)
    train_ids = [s.sample_id for s in dm.split("train")]
    assert {source_of(i) for i in train_ids} == {"idrid", "synthetic", "unlabeled"}
    assert sum(i.startswith("unlabeled/") for i in train_ids) == UNLABELED_IMAGES
    assert set(TeacherCache(student_cfg.kd.cache_dir, tasks).rows) == set(train_ids)
    idrid_test = {s.sample_id for s in dm.split("test") if source_of(s.sample_id) == "idrid"}
    assert idrid_test == {f"idrid/test/IDRiD_00{i}" for i in (1, 2)}  # the official test split

    seen = set()
    for batch in dm.train_dataloader():
        for i, sample_id in enumerate(batch["sample_id"]):
            seen.add(sample_id)
            source = source_of(sample_id)
            for task in tasks:
                assert bool(batch["has"][task][i]) == expected_has(source, task), (sample_id, task)
        assert set(batch["teacher"]) == set(tasks)  # every sample has teacher outputs, KD applies
    assert seen == set(train_ids)

    student = fit(student_cfg)
    assert student.is_file() and student.parent == tmp_path / "student" / "checkpoints"


def test_each_source_gets_its_own_validation_split(combined):
    cfg = load_config("teacher", combined(**{"data.val_fraction": 0.5}))
    splits = {s.sample_id: s.split for s in load_samples(cfg.data)}
    # synthetic ships a val split; IDRiD does not, so its val is carved from its own train.
    assert "val" in {split for i, split in splits.items() if i.startswith("idrid/train/")}
    del cfg.data.sources["synthetic"]  # now no source has a val split to borrow
    splits = {s.sample_id: s.split for s in load_samples(cfg.data)}
    assert {split for i, split in splits.items() if source_of(i) == "unlabeled"} == {"train"}
