"""REFUGE (Retinal Fundus Glaucoma Challenge): training and validation sets as released."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_modules.adapters._common import (
    Row,
    cache_dir,
    cached_masks,
    find_csv,
    image_index,
    read_csv,
    read_gray,
    require_image,
)
from data_modules.samples import Sample, register_source

TRAIN_IMAGES = "Training400"
TRAIN_TRUTH = "Annotation-Training400"
VAL_IMAGES = "REFUGE-Validation400"
VAL_TRUTH = "REFUGE-Validation400-GT"
CLASS_FOLDERS = {"Glaucoma": 1.0, "Non-Glaucoma": 0.0}
FOVEA_CSV = "Fovea_location*.csv"  # the official tables are .xlsx: export them to CSV
GLAUCOMA_COLUMN = "Glaucoma Label"


@register_source("refuge")
def read_refuge(root: Path, mask_dir: str | None = None) -> list[Sample]:
    """``Training400/{Glaucoma,Non-Glaucoma}/*.jpg`` -> label glaucoma 1/0 (split train) and
    ``REFUGE-Validation400/*.jpg`` (split val). Disc/cup bitmaps
    ``Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/<stem>.bmp`` and
    ``REFUGE-Validation400-GT/Disc_Cup_Masks/<stem>.bmp`` (0 cup, 128 rim, 255 background) are
    split into binary masks optic_disc (disc incl. cup) and optic_cup written into ``mask_dir``
    (default ``<MTKD_CACHE_DIR>/masks/refuge-<root digest>``). A CSV export
    ``Fovea_location*.csv`` of the fovea table (ImgName, Fovea_X, Fovea_Y[, Glaucoma Label]) next
    to the bitmaps -> point fovea (and the validation glaucoma label). Missing bitmaps or tables leave those labels out.
    """
    masks_folder = cache_dir(root, mask_dir, "masks", "refuge")
    samples = []
    if (root / TRAIN_IMAGES).is_dir():
        samples += _training(root, masks_folder / "train")
    if (root / VAL_IMAGES).is_dir():
        samples += _validation(root, masks_folder / "val")
    if not samples:
        raise FileNotFoundError(
            f"REFUGE: expected {TRAIN_IMAGES}/ and/or {VAL_IMAGES}/ with images in {root}; point "
            "`root` at the folder holding the unpacked REFUGE archives"
        )
    return samples


def _training(root: Path, masks_folder: Path) -> list[Sample]:
    found = {
        stem: (image, folder)
        for folder in CLASS_FOLDERS
        for stem, image in image_index(root / TRAIN_IMAGES / folder).items()
    }
    images = {stem: image for stem, (image, _) in found.items()}
    table = _fovea_table(root / TRAIN_TRUTH, images, root / TRAIN_IMAGES)
    samples = []
    for stem, (image, folder) in sorted(found.items()):
        labels = {"glaucoma": CLASS_FOLDERS[folder]}
        bitmap = root / TRAIN_TRUTH / "Disc_Cup_Masks" / folder / f"{stem}.bmp"
        samples.append(_sample("train", stem, image, labels, table.get(stem), bitmap, masks_folder))
    return samples


def _validation(root: Path, masks_folder: Path) -> list[Sample]:
    images = image_index(root / VAL_IMAGES)
    table = _fovea_table(root / VAL_TRUTH, images, root / VAL_IMAGES)
    samples = []
    for stem, image in images.items():
        row = table.get(stem)
        labels = (
            {"glaucoma": row.number(GLAUCOMA_COLUMN)}
            if row is not None and GLAUCOMA_COLUMN in row
            else {}
        )
        bitmap = root / VAL_TRUTH / "Disc_Cup_Masks" / f"{stem}.bmp"
        samples.append(_sample("val", stem, image, labels, row, bitmap, masks_folder))
    return samples


def _fovea_table(folder: Path, images: dict[str, Path], image_folder: Path) -> dict[str, Row]:
    """Rows of the optional fovea CSV by image stem; every row must name an existing image."""
    path = find_csv(folder, FOVEA_CSV, required=False)
    if path is None:
        return {}
    rows = read_csv(path, ["ImgName", "Fovea_X", "Fovea_Y"], optional=[GLAUCOMA_COLUMN])
    table = {}
    for row in rows:
        stem = require_image(images, row["ImgName"], path, image_folder).stem
        table[stem] = row
    return table


def _sample(
    split: str,
    stem: str,
    image: Path,
    labels: dict[str, float],
    row: Row | None,
    bitmap: Path,
    masks_folder: Path,
) -> Sample:
    points = {"fovea": (row.number("Fovea_X"), row.number("Fovea_Y"))} if row is not None else {}
    masks = {}
    if bitmap.is_file():
        outputs = {
            name: masks_folder / f"{stem}_{name}.png" for name in ("optic_disc", "optic_cup")
        }
        masks = cached_masks(bitmap, outputs, _disc_and_cup)
    sample_id = f"refuge/{split}/{stem}"
    return Sample(sample_id, sample_id, str(image), split, labels, masks, points)


def _disc_and_cup(bitmap: Path) -> dict[str, np.ndarray]:
    """REFUGE bitmaps: 0 cup, 128 disc rim, 255 background; the disc includes the cup."""
    values = read_gray(bitmap)
    return {"optic_disc": values < 255, "optic_cup": values == 0}
