"""ODIR-5K (Ocular Disease Intelligent Recognition): eight patient-level disease labels and
each eye's diagnostic keywords."""

from __future__ import annotations

import re
from pathlib import Path

from data_modules.adapters._common import image_index, image_stem, read_csv, require_image
from data_modules.samples import Sample, register_source

CSV_NAMES = ("full_df.csv", "data.csv")
IMAGE_FOLDERS = ("ODIR-5K_Training_Dataset", "Training Images", "preprocessed_images")
LABELS = ("N", "D", "G", "C", "A", "H", "M", "O")
#: each eye's keyword column, read into the text ``keywords`` of that eye's image
KEYWORDS = {"Left-Fundus": "Left-Diagnostic Keywords", "Right-Fundus": "Right-Diagnostic Keywords"}


def keyword_list(cell: str) -> str:
    """ODIR's keywords (separated by ``，`` or ``,``) as one lower-case ``a, b`` list."""
    return ", ".join(k.strip().lower() for k in re.split("[，,]", cell) if k.strip())


@register_source("odir5k")
def read_odir5k(root: Path) -> list[Sample]:
    """A CSV export of the annotations (``full_df.csv`` or ``data.csv``: ID, Left-Fundus,
    Right-Fundus, N, D, G, C, A, H, M, O; the official table is .xlsx) with the images in
    ``ODIR-5K_Training_Dataset/``, ``Training Images/`` or ``preprocessed_images/`` -> one sample
    per eye image, labels N..O (0/1, per patient as annotated), patient ``odir/<ID>``, and the
    text ``keywords`` from that eye's Left-/Right-Diagnostic Keywords column where the CSV has it.
    Where the CSV has a ``filename`` column (Kaggle's full_df.csv: one row per kept image) only
    that image of each row is used. No official split (split None).
    """
    path = _first(root, CSV_NAMES, "annotation CSV (export of the .xlsx)")
    folder = _first(root, IMAGE_FOLDERS, "image folder")
    columns = ["ID", "Left-Fundus", "Right-Fundus", *LABELS]
    rows = read_csv(path, columns, optional=["filename", *KEYWORDS.values()])
    images = image_index(folder)
    samples: dict[str, Sample] = {}
    for row in rows:
        names = (
            [row["filename"]] if row.get("filename") else [row["Left-Fundus"], row["Right-Fundus"]]
        )
        labels = {label: row.number(label) for label in LABELS}
        keywords = {
            image_stem(row[eye]): keyword_list(row.get(column, ""))
            for eye, column in KEYWORDS.items()
        }
        for name in names:
            if image_stem(name) in samples:
                continue
            image = require_image(images, name, path, folder)
            sample_id = f"odir5k/train/{image.stem}"
            said = keywords.get(image_stem(name))
            texts = {"keywords": said} if said else {}
            samples[image.stem] = Sample(
                sample_id, f"odir/{row['ID']}", str(image), None, labels, texts=texts
            )
    return list(samples.values())


def _first(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"ODIR-5K: expected an {what} in {root}, one of {list(names)}")
