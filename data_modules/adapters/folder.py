"""A plain folder of unlabeled fundus images (for distillation on unlabeled data)."""

from __future__ import annotations

from pathlib import Path

from data_modules.io import IMAGE_SUFFIXES
from data_modules.samples import Sample, register_source


@register_source("folder")
def read_folder(root: Path, name: str = "folder") -> list[Sample]:
    """Every image under ``root``, recursively (jpg, jpeg, png, tif, tiff, bmp in any case;
    hidden files and folders skipped), sorted, unlabeled, split train.
    Sample id ``<name>/<path relative to root without extension>``.
    """
    samples = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(
            part.startswith(".") for part in relative.parts
        ):
            continue
        sample_id = f"{name}/{relative.with_suffix('').as_posix()}"
        samples.append(Sample(sample_id, sample_id, str(path), "train"))
    return samples
