"""A data source in one file outside the library: a folder of photographs with a ``grades.csv``
(columns ``image``, ``grade`` and optionally ``patient``), read into Sample records.

Use it with ``plugins: [data_source]`` (this folder on PYTHONPATH) and
``data.sources.mine: {kind: graded_folder, root: path/to/folder}``; the grade is the raw label
``grade``, which a task reads with ``label: grade`` (or rename it with ``label_map``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from data_modules.samples import Sample, register_source


@register_source("graded_folder")
def graded_folder(root: Path, file: str = "grades.csv") -> list[Sample]:
    """Source kind ``graded_folder``: one row per photograph; no official split, so train, val
    and test are carved by patient (the ``patient`` column, else one patient per image)."""
    path = root / file
    if not path.is_file():
        raise FileNotFoundError(f"graded_folder: {path} does not exist; write image,grade rows")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    samples = []
    for line, row in enumerate(rows, start=2):
        stem = Path(row["image"]).stem
        try:
            grade = float(row["grade"])
        except ValueError:
            raise ValueError(
                f"{path} line {line}: grade={row['grade']!r} is not a number"
            ) from None
        samples.append(
            Sample(
                sample_id=f"graded/{stem}",
                patient_id=row.get("patient") or stem,
                image=str(root / row["image"]),
                labels={"grade": grade},
                origin=f"{path} line {line}",
            )
        )
    return samples
