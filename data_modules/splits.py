"""Patient-level, stratified, seeded train/val/test assignment, saved and reused as JSON.

Official splits are respected. Where a source has no validation split, validation is carved
from its training patients; where it has no split at all, train/val/test are carved together.
Both eyes of a patient always land on the same side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from pathlib import Path

from data_modules.io import atomic_write_bytes
from data_modules.samples import Sample


def rank(seed: int, key: str) -> str:
    """Stable pseudo-random order that does not depend on Python's hash seed."""
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def carve(
    samples: list[Sample],
    fractions: dict[str, float],
    seed: int,
    stratify_on: str | None,
) -> dict[str, str]:
    """Assign each patient of ``samples`` to one of ``fractions``' splits; returns id -> split.

    Within each stratum (the patient's highest value of ``stratify_on``; unlabeled patients form
    their own stratum), patients are ordered pseudo-randomly and cut by the fractions.
    """
    patients: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        patients[s.patient_id].append(s)
    strata: dict[str, list[str]] = defaultdict(list)
    for pid, group in patients.items():
        values = [s.labels[stratify_on] for s in group if stratify_on and stratify_on in s.labels]
        strata[str(max(values)) if values else "none"].append(pid)
    names = list(fractions)
    assignment = {}
    for stratum in sorted(strata):
        pids = sorted(strata[stratum], key=lambda p: rank(seed, p))
        bounds, acc = [], 0.0
        for name in names:
            acc += fractions[name]
            bounds.append(round(acc * len(pids)))
        bounds[-1] = len(pids)
        for i, pid in enumerate(pids):
            split = next(n for n, b in zip(names, bounds) if i < b)
            for s in patients[pid]:
                assignment[s.sample_id] = split
    return assignment


def assign_splits(
    samples: list[Sample],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify_on: str | None = None,
) -> list[Sample]:
    """Return samples with ``split`` set to train, val or test."""
    has_val = any(s.split == "val" for s in samples)
    unsplit = [s for s in samples if s.split is None]
    official_train = [s for s in samples if s.split == "train"]
    assignment: dict[str, str] = {}
    if unsplit:
        train_share = 1.0 - val_fraction - test_fraction
        assignment.update(
            carve(
                unsplit,
                {"train": train_share, "val": val_fraction, "test": test_fraction},
                seed,
                stratify_on,
            )
        )
    if official_train and not has_val and val_fraction > 0:
        assignment.update(
            carve(
                official_train,
                {"train": 1.0 - val_fraction, "val": val_fraction},
                seed,
                stratify_on,
            )
        )
    return [dataclasses.replace(s, split=assignment.get(s.sample_id, s.split)) for s in samples]


def save_splits(samples: list[Sample], path: str | Path) -> None:
    mapping = {s.sample_id: s.split for s in sorted(samples, key=lambda s: s.sample_id)}
    atomic_write_bytes(path, json.dumps(mapping, indent=1).encode())


def load_splits(samples: list[Sample], path: str | Path) -> list[Sample]:
    """Apply a saved split file; it must cover exactly these samples."""
    mapping = json.loads(Path(path).read_text())
    ids = {s.sample_id for s in samples}
    missing, extra = sorted(ids - set(mapping)), sorted(set(mapping) - ids)
    if missing or extra:
        raise ValueError(
            f"split file {path} does not match the configured data: {len(missing)} samples are not "
            f"in it (e.g. {missing[:3]}), {len(extra)} listed samples are gone (e.g. {extra[:3]}). "
            "Delete the file to carve new splits, or point data.split_file elsewhere."
        )
    return [dataclasses.replace(s, split=mapping[s.sample_id]) for s in samples]
