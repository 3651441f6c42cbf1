"""Split assignment: by patient, stratified, seeded, official splits kept, saved and reloaded."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from data_modules.samples import Sample
from data_modules.splits import assign_splits, load_splits, save_splits

pytestmark = pytest.mark.unit

#: DR grade of each patient: skewed like screening data (60 / 25 / 15 %)
GRADES = [0] * 60 + [1] * 25 + [2] * 15


def patients(split: str | None = None, prefix: str = "p") -> list[Sample]:
    """Two eyes per patient, both with the patient's grade (100 patients, 200 samples)."""
    return [
        Sample(f"{prefix}{i:03d}_{eye}", f"{prefix}{i:03d}", f"{i}.jpg", split, {"dr": grade})
        for i, grade in enumerate(GRADES)
        for eye in "LR"
    ]


def split_of(samples: list[Sample]) -> dict[str, str]:
    return {s.sample_id: s.split for s in samples}


def grade_shares(samples: list[Sample], split: str) -> dict[int, float]:
    counts = Counter(int(s.labels["dr"]) for s in samples if s.split == split)
    total = sum(counts.values())
    return {grade: counts[grade] / total for grade in sorted(set(GRADES))}


def test_both_eyes_of_a_patient_share_a_split():
    samples = assign_splits(patients(), 0.15, 0.15, seed=0, stratify_on="dr")
    by_patient = defaultdict(set)
    for s in samples:
        by_patient[s.patient_id].add(s.split)
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert {s.split for s in samples} == {"train", "val", "test"}


def test_stratification_keeps_class_proportions():
    samples = assign_splits(patients(), 0.2, 0.2, seed=0, stratify_on="dr")
    overall = {0: 0.60, 1: 0.25, 2: 0.15}
    for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert sum(s.split == split for s in samples) == pytest.approx(share * 200, abs=4)
        assert grade_shares(samples, split) == pytest.approx(overall, abs=0.03)


def test_official_test_is_kept_and_val_is_carved_from_train_only():
    train, test = patients("train"), patients("test", prefix="t")
    samples = assign_splits(train + test, 0.15, 0.15, seed=0, stratify_on="dr")
    splits = split_of(samples)
    assert all(splits[s.sample_id] == "test" for s in test)
    assert {splits[s.sample_id] for s in train} == {"train", "val"}
    val = [s for s in samples if s.split == "val"]
    assert len(val) == pytest.approx(0.15 * len(train), abs=4)
    assert grade_shares(samples, "val") == pytest.approx(grade_shares(train, "train"), abs=0.03)


def test_an_official_val_split_is_not_recarved():
    samples = patients("train")[:100] + patients("val", prefix="v")[:20]
    assert assign_splits(samples, 0.15, 0.15, seed=0) == samples


def test_no_validation_is_carved_when_val_fraction_is_zero():
    samples = patients("train")
    assert assign_splits(samples, 0.0, 0.15, seed=0) == samples


def test_the_seed_decides_the_split():
    first = split_of(assign_splits(patients(), 0.15, 0.15, seed=3, stratify_on="dr"))
    again = split_of(assign_splits(patients(), 0.15, 0.15, seed=3, stratify_on="dr"))
    other = split_of(assign_splits(patients(), 0.15, 0.15, seed=4, stratify_on="dr"))
    assert first == again
    assert first != other


def test_the_split_does_not_depend_on_sample_order():
    samples = patients()
    forward = split_of(assign_splits(samples, 0.15, 0.15, seed=0, stratify_on="dr"))
    backward = split_of(assign_splits(samples[::-1], 0.15, 0.15, seed=0, stratify_on="dr"))
    assert forward == backward


def test_saved_splits_load_back(tmp_path: Path):
    path = tmp_path / "splits" / "split.json"
    samples = assign_splits(patients(), 0.15, 0.15, seed=0, stratify_on="dr")
    save_splits(samples, path)
    unsplit = patients()
    assert split_of(load_splits(unsplit, path)) == split_of(samples)
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left


def test_a_split_file_for_other_data_is_refused(tmp_path: Path):
    path = tmp_path / "split.json"
    save_splits(assign_splits(patients(), 0.15, 0.15, seed=0), path)
    grown = patients() + [Sample("new_L", "new", "new.jpg")]
    with pytest.raises(ValueError, match=r"1 samples are not in it .*'new_L'.*Delete the file"):
        load_splits(grown, path)
    shrunk = patients()[2:]
    with pytest.raises(ValueError, match=r"2 listed samples are gone .*'p000_L'"):
        load_splits(shrunk, path)
