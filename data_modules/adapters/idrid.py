"""IDRiD (Indian Diabetic Retinopathy Image Dataset), parts A, B and C as officially released."""

from __future__ import annotations

from pathlib import Path

from data_modules.adapters._common import (
    existing,
    find_csv,
    image_index,
    read_csv,
    require_image,
)
from data_modules.samples import Sample, register_source

PART_FOLDERS = {"A": "A. Segmentation", "B": "B. Disease Grading", "C": "C. Localization"}
SET_FOLDERS = {"train": "a. Training Set", "test": "b. Testing Set"}
CSV_TAGS = {"train": "Training", "test": "Testing"}
POINT_FOLDERS = {"optic_disc": "1. Optic Disc Center Location", "fovea": "2. Fovea Center Location"}
LESION_FOLDERS = {
    "microaneurysms": ("1. Microaneurysms", "MA"),
    "haemorrhages": ("2. Haemorrhages", "HE"),
    "hard_exudates": ("3. Hard Exudates", "EX"),
    "soft_exudates": ("4. Soft Exudates", "SE"),
    "optic_disc": ("5. Optic Disc", "OD"),
}


@register_source("idrid")
def read_idrid(root: Path, parts: list[str] | None = None) -> list[Sample]:
    """IDRiD under ``root`` with any of its parts unpacked side by side:

    ``B. Disease Grading/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NNN.jpg`` and
    ``B. Disease Grading/2. Groundtruths/*{Training,Testing}*.csv`` -> labels dr_grade, dme_risk;
    ``C. Localization/2. Groundtruths/{1. Optic Disc,2. Fovea} Center Location/*{Training,Testing}*.csv``
    -> points optic_disc, fovea (images under part B or ``C. Localization/1. Original Images``);
    ``A. Segmentation/1. Original Images/<set>/IDRiD_NN.jpg`` and
    ``A. Segmentation/2. All Segmentation Groundtruths/<set>/<n. Lesion>/IDRiD_NN_<XX>.tif``
    -> masks (ids ``idrid/seg-<split>/...``: part A photographs differ from B/C's).
    ``parts`` restricts to some of "A", "B", "C" (default: every part present).
    """
    chosen = _chosen_parts(root, parts)
    samples = _segmentation_samples(root / PART_FOLDERS["A"]) if "A" in chosen else []
    if chosen & {"B", "C"}:
        samples += [s for split in SET_FOLDERS for s in _photo_samples(root, chosen, split)]
    return samples


def _chosen_parts(root: Path, parts: list[str] | None) -> set[str]:
    if parts is None:
        found = {p for p, folder in PART_FOLDERS.items() if (root / folder).is_dir()}
        if not found:
            raise FileNotFoundError(
                f"IDRiD: none of the folders {list(PART_FOLDERS.values())} is in {root}; point "
                "`root` at the folder holding the unpacked IDRiD parts"
            )
        return found
    unknown = sorted(set(parts) - set(PART_FOLDERS))
    if unknown:
        raise ValueError(f"IDRiD: unknown parts {unknown}; valid parts are {list(PART_FOLDERS)}")
    missing = [PART_FOLDERS[p] for p in parts if not (root / PART_FOLDERS[p]).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"IDRiD: option parts={parts} needs the folders {missing} in {root}; unpack them "
            "there or drop them from `parts`"
        )
    return set(parts)


def _photo_samples(root: Path, chosen: set[str], split: str) -> list[Sample]:
    """Part B/C samples of one split: the same photographs carry grades and points."""
    grades = _grades(root, split) if "B" in chosen else {}
    points = _points(root, split) if "C" in chosen else {}
    folders = [
        root / PART_FOLDERS[p] / "1. Original Images" / SET_FOLDERS[split] for p in ("C", "B")
    ]
    images = {k: v for f in folders if f.is_dir() for k, v in image_index(f).items()}
    listed_in = f"the IDRiD {split} ground-truth CSVs under {root}"
    where = " or ".join(str(f) for f in folders)
    samples = []
    for name in sorted(set(grades) | set(points)):
        image = require_image(images, name, listed_in, where)
        sample_id = f"idrid/{split}/{name}"
        labels, located = grades.get(name, {}), points.get(name, {})
        samples.append(
            Sample(sample_id, sample_id, str(image), split, labels=labels, points=located)
        )
    return samples


def _grades(root: Path, split: str) -> dict[str, dict[str, float]]:
    folder = root / PART_FOLDERS["B"] / "2. Groundtruths"
    path = find_csv(folder, f"*{CSV_TAGS[split]}*.csv")
    rows = read_csv(path, ["Image name", "Retinopathy grade", "Risk of macular edema"])
    return {
        row["Image name"]: {
            "dr_grade": row.number("Retinopathy grade"),
            "dme_risk": row.number("Risk of macular edema"),
        }
        for row in rows
    }


def _points(root: Path, split: str) -> dict[str, dict[str, tuple[float, float]]]:
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for point, folder_name in POINT_FOLDERS.items():
        folder = root / PART_FOLDERS["C"] / "2. Groundtruths" / folder_name
        path = find_csv(folder, f"*{CSV_TAGS[split]}*.csv")
        for row in read_csv(path, ["Image No", "X- Coordinate", "Y - Coordinate"]):
            xy = (row.number("X- Coordinate"), row.number("Y - Coordinate"))
            points.setdefault(row["Image No"], {})[point] = xy
    return points


def _segmentation_samples(part: Path) -> list[Sample]:
    samples = []
    for split, set_folder in SET_FOLDERS.items():
        images = image_index(part / "1. Original Images" / set_folder)
        truth = part / "2. All Segmentation Groundtruths" / set_folder
        if not truth.is_dir():
            raise FileNotFoundError(
                f"IDRiD part A: expected the ground-truth folder {truth}; restore it from the "
                "download or pass parts without 'A'"
            )
        for name, image in images.items():
            candidates = {
                mask: truth / folder / f"{name}_{code}.tif"
                for mask, (folder, code) in LESION_FOLDERS.items()
            }
            sample_id = f"idrid/seg-{split}/{name}"
            samples.append(
                Sample(sample_id, sample_id, str(image), split, masks=existing(candidates))
            )
    return samples
