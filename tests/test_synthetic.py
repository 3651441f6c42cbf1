"""The synthetic fundus generator: determinism, label/mask consistency, anatomy, splits, and the
manifest round trip it shares with real data."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_modules.synthetic as synthetic
from data_modules.io import load_image, load_mask
from data_modules.manifest import read_manifest
from data_modules.samples import SPLITS, Sample, read_source
from data_modules.synthetic import MASK_NAMES, generate_synthetic

SIZE = 128
N = 40
LESIONS = ("microaneurysms", "haemorrhages", "hard_exudates", "neovascularization")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Sample, np.ndarray, dict]]:
    """One small dataset shared by the read-only tests: (sample, image, masks as bool arrays)."""
    root = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(root, n=N, image_size=SIZE, seed=0, progress=False)
    return [
        (s, load_image(s.image), {k: load_mask(v).astype(bool) for k, v in s.masks.items()})
        for s in read_manifest(root)
    ]


def _disc_diameter(disc: np.ndarray) -> float:
    return 2 * np.sqrt(disc.sum() / np.pi)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.unit
def test_same_seed_gives_identical_files_and_another_seed_other_images(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate_synthetic(tmp_path / name, n=20, image_size=SIZE, seed=seed, progress=False)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    images = [k for k in a if k.startswith("images/")]
    assert len(images) == 20
    assert all(a[k] != c[k] for k in images)


@pytest.mark.unit
def test_files_labels_and_masks_have_the_documented_shape(tmp_path: Path) -> None:
    root = tmp_path / "data"
    manifest = generate_synthetic(root, n=4, image_size=SIZE, seed=0, progress=False)
    assert manifest == root / "manifest.csv"
    params = json.loads((root / "synth.json").read_text())
    assert params == {"n": 4, "image_size": SIZE, "seed": 0, "version": synthetic.VERSION}
    samples = read_manifest(manifest)
    assert [s.sample_id for s in samples] == [
        "synth_0000_L",
        "synth_0000_R",
        "synth_0001_L",
        "synth_0001_R",
    ]
    for s in samples:
        assert set(s.labels) == {"dr_grade", "dme_risk", "glaucoma", "cdr", "eye"}
        assert set(s.masks) == set(MASK_NAMES)
        assert set(s.points) == {"optic_disc", "fovea"}
        assert s.labels["eye"] == (1.0 if s.sample_id.endswith("_R") else 0.0)
        with Image.open(s.image) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (SIZE, SIZE))
        for path in s.masks.values():
            with Image.open(path) as mask:
                assert (mask.format, mask.size) == ("PNG", (SIZE, SIZE))
                assert set(np.unique(np.asarray(mask))) <= {0, 255}


@pytest.mark.unit
def test_lesion_masks_match_the_dr_grade(dataset: list) -> None:
    for s, _, masks in dataset:
        grade = int(s.labels["dr_grade"])
        present = {name: bool(masks[name].any()) for name in LESIONS}
        if grade == 0:
            assert not any(present.values()), s.sample_id
        else:
            assert present["microaneurysms"], s.sample_id
        assert present["haemorrhages"] == (grade >= 2), s.sample_id
        assert present["hard_exudates"] == (grade >= 2), s.sample_id
        if present["neovascularization"]:
            assert grade == 4, s.sample_id
        if grade == 3:  # haemorrhages in all four quadrants of the image
            ys, xs = np.nonzero(masks["haemorrhages"])
            middle = (SIZE - 1) / 2
            quadrants = {(bool(x > middle), bool(y > middle)) for x, y in zip(xs, ys)}
            assert len(quadrants) == 4, s.sample_id
    grades = [int(s.labels["dr_grade"]) for s, _, _ in dataset]
    assert set(grades) == {0, 1, 2, 3, 4}
    assert any(m["neovascularization"].any() for _, _, m in dataset)


@pytest.mark.unit
def test_dme_risk_matches_exudate_distance_to_fovea(dataset: list) -> None:
    for s, _, masks in dataset:
        diameter = _disc_diameter(masks["optic_disc"])
        ys, xs = np.nonzero(masks["hard_exudates"])
        fx, fy = s.points["fovea"]
        nearest = np.hypot(xs - fx, ys - fy).min() if len(xs) else np.inf
        expected = 2 if nearest <= diameter else 1 if nearest <= 2 * diameter else 0
        assert s.labels["dme_risk"] == expected, s.sample_id
    assert {int(s.labels["dme_risk"]) for s, _, _ in dataset} == {0, 1, 2}


@pytest.mark.unit
def test_cup_disc_ratio_and_glaucoma(dataset: list) -> None:
    for s, _, masks in dataset:
        cdr = s.labels["cdr"]
        assert 0.2 <= cdr <= 0.85
        assert s.labels["glaucoma"] == float(cdr >= 0.6), s.sample_id
        disc, cup = masks["optic_disc"], masks["optic_cup"]
        assert cup.any() and not (cup & ~disc).any(), s.sample_id
        vertical = cup.any(axis=1).sum() / disc.any(axis=1).sum()
        assert vertical == pytest.approx(cdr, abs=0.1), s.sample_id
    assert {s.labels["glaucoma"] for s, _, _ in dataset} == {0.0, 1.0}


@pytest.mark.unit
def test_masks_lie_inside_the_field_of_view(dataset: list) -> None:
    for s, image, masks in dataset:
        brightness = image.max(axis=2)
        assert brightness[:4, :4].max() < 12 and brightness[-4:, -4:].max() < 12
        fov = brightness > 12
        for name, mask in masks.items():
            assert not (mask & ~fov).any(), (s.sample_id, name)
        assert masks["vessels"].sum() > 0.03 * fov.sum(), s.sample_id


@pytest.mark.unit
def test_disc_fovea_and_mirrored_eyes(dataset: list) -> None:
    middle = (SIZE - 1) / 2
    for s, _, masks in dataset:
        (dx, dy), (fx, fy) = s.points["optic_disc"], s.points["fovea"]
        assert masks["optic_disc"][round(dy), round(dx)], s.sample_id
        right = s.labels["eye"] == 1
        # Right eye: disc right of centre, fovea temporal (left of it); left eye mirrored.
        assert (dx > middle) == right and (fx < dx) == right, s.sample_id
        distance = np.hypot(fx - dx, fy - dy) / _disc_diameter(masks["optic_disc"])
        assert 2.2 < distance < 2.8, s.sample_id
        assert fy >= dy, s.sample_id  # fovea slightly below the disc


@pytest.mark.unit
def test_split_by_patient_with_both_eyes(dataset: list) -> None:
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s, _, _ in dataset:
        by_patient[s.patient_id].append(s)
    assert len(by_patient) == N // 2
    split_of = {}
    for patient, eyes in by_patient.items():
        assert sorted(e.sample_id for e in eyes) == [f"{patient}_L", f"{patient}_R"]
        assert len({e.split for e in eyes}) == 1, patient
        grades = [e.labels["dr_grade"] for e in eyes]
        assert abs(grades[0] - grades[1]) <= 1, patient
        split_of[patient] = eyes[0].split
    counts = {split: list(split_of.values()).count(split) for split in SPLITS}
    assert counts == {"train": 14, "val": 3, "test": 3}


@pytest.mark.unit
def test_source_generates_once_then_reuses_and_rejects_other_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "synthetic"
    options = {"n": 20, "image_size": SIZE, "seed": 3}
    first = read_source("synthetic", root, options)
    assert len(first) == 20 and first == read_manifest(root)

    def must_not_generate(*args: object, **kwargs: object) -> Path:
        raise AssertionError("an existing dataset was generated again")

    monkeypatch.setattr(synthetic, "generate_synthetic", must_not_generate)
    assert read_source("synthetic", root, options) == first
    with pytest.raises(ValueError, match="'seed': 3.*'seed': 4.*[Dd]elete"):
        read_source("synthetic", root, {**options, "seed": 4})


@pytest.mark.unit
def test_odd_n_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        generate_synthetic(tmp_path / "a", n=7, image_size=SIZE, progress=False)
    with pytest.raises(ValueError, match="even"):
        read_source("synthetic", tmp_path / "b", {"n": 7})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_output_appears_complete_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_synthetic(tmp_path / "done", n=2, image_size=SIZE, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["done"]
    assert (tmp_path / "done" / "synth.json").is_file()
    (tmp_path / "plain").mkdir()  # the dataset folder gets the permissions of a plain mkdir
    assert (tmp_path / "done").stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").rmdir()
    with pytest.raises(FileExistsError):
        generate_synthetic(tmp_path / "done", n=2, image_size=SIZE, progress=False)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic(tmp_path / "crashed", n=2, image_size=SIZE, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["done"]


@pytest.mark.unit
def test_a_concurrent_generator_that_finishes_first_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes (e.g. DDP ranks) generating the same folder: the later one keeps the first."""
    root = tmp_path / "data"
    write_manifest = synthetic.write_manifest

    def other_process_finishes_first(samples: list[Sample], path: Path) -> Path:
        monkeypatch.setattr(synthetic, "write_manifest", write_manifest)
        generate_synthetic(root, n=2, image_size=SIZE, seed=0, progress=False)
        return write_manifest(samples, path)

    monkeypatch.setattr(synthetic, "write_manifest", other_process_finishes_first)
    assert generate_synthetic(root, n=2, image_size=SIZE, seed=0, progress=False) == (
        root / "manifest.csv"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert len(read_manifest(root)) == 2
