"""APTOS 2019 Blindness Detection (Kaggle): DR grades of the training set."""

from __future__ import annotations

from pathlib import Path

from data_modules.adapters._common import image_index, read_csv, require_image
from data_modules.samples import Sample, register_source


@register_source("aptos2019")
def read_aptos2019(root: Path, include_unlabeled_test: bool = False) -> list[Sample]:
    """``train.csv`` (id_code, diagnosis) with ``train_images/<id_code>.png`` -> label dr_grade.
    The test labels were never published: ``include_unlabeled_test=True`` adds ``test.csv``
    (id_code) with ``test_images/`` as unlabeled samples. No official split (split None).
    """
    samples = _read(root, "train", ["id_code", "diagnosis"])
    if include_unlabeled_test:
        samples += _read(root, "test", ["id_code"])
    return samples


def _read(root: Path, subset: str, columns: list[str]) -> list[Sample]:
    path = root / f"{subset}.csv"
    rows = read_csv(path, columns)
    images = image_index(root / f"{subset}_images")
    samples = []
    for row in rows:
        image = require_image(images, row["id_code"], path, root / f"{subset}_images")
        labels = {"dr_grade": row.number("diagnosis")} if "diagnosis" in row else {}
        sample_id = f"aptos2019/{subset}/{image.stem}"
        samples.append(Sample(sample_id, sample_id, str(image), None, labels))
    return samples
