"""EyePACS (Kaggle Diabetic Retinopathy Detection, 2015): DR grades of the training set."""

from __future__ import annotations

import re
from pathlib import Path

from data_modules.adapters._common import image_index, read_csv, require_image
from data_modules.samples import Sample, register_source

EYE_NAME = re.compile(r"(\d+)_(left|right)")


@register_source("eyepacs")
def read_eyepacs(root: Path) -> list[Sample]:
    """``trainLabels.csv`` (image, level) with ``train/<image>.jpeg`` (or the images directly
    in ``root``) -> label dr_grade. ``NN_left``/``NN_right`` -> patient ``eyepacs/NN``.
    No official split (split None).
    """
    path = root / "trainLabels.csv"
    rows = read_csv(path, ["image", "level"])
    folder = root / "train" if (root / "train").is_dir() else root
    images = image_index(folder)
    samples = []
    for row in rows:
        image = require_image(images, row["image"], path, folder)
        sample_id = f"eyepacs/train/{image.stem}"
        eye = EYE_NAME.fullmatch(image.stem)
        patient_id = f"eyepacs/{eye.group(1)}" if eye else sample_id
        samples.append(
            Sample(sample_id, patient_id, str(image), None, {"dr_grade": row.number("level")})
        )
    return samples
