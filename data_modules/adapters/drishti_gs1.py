"""Drishti-GS1: optic disc and cup soft maps from four experts, with their cup-to-disc ratios."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.adapters._common import cache_dir, cached_masks, image_index, read_gray
from data_modules.samples import Sample, register_source

FILES_FOLDER = "Drishti-GS1_files"
SET_FOLDERS = {"train": "Training", "test": "Test"}
GT_FOLDERS = ("GT", "Test_GT")  # the test ground truth was released later as Test_GT in some copies
SOFT_MAPS = {"optic_disc": "ODseg", "optic_cup": "cupseg"}
MAJORITY = 128  # soft maps average the experts: >= 128 of 255 means at least half agree
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@register_source("drishti_gs1")
def read_drishti_gs1(root: Path, mask_dir: str | None = None) -> list[Sample]:
    """``Drishti-GS1_files/{Training,Test}/Images/drishtiGS_NNN.png`` (``root`` is that folder or
    the one holding it) with ``.../GT/drishtiGS_NNN/SoftMap/drishtiGS_NNN_{ODseg,cupseg}Softmap*.png``
    binarised at the expert majority into ``mask_dir`` (default
    ``<MTKD_CACHE_DIR>/masks/drishti_gs1-<root digest>``) -> masks optic_disc, optic_cup, and
    ``.../GT/drishtiGS_NNN/drishtiGS_NNN_cdrValues.txt`` -> label cdr (mean of the experts).
    """
    files = _files_folder(root)
    masks_folder = cache_dir(root, mask_dir, "masks", "drishti_gs1")
    samples = []
    for split, set_folder in SET_FOLDERS.items():
        if (files / set_folder / "Images").is_dir():
            samples += _split_samples(files / set_folder, split, masks_folder / split)
    return samples


def _split_samples(folder: Path, split: str, masks_folder: Path) -> list[Sample]:
    truth = next((folder / g for g in GT_FOLDERS if (folder / g).is_dir()), None)
    samples = []
    for stem, image in image_index(folder / "Images").items():
        labels, masks = {}, {}
        if truth is not None and (truth / stem).is_dir():
            labels = _cdr(truth / stem / f"{stem}_cdrValues.txt")
            masks = _masks(truth / stem / "SoftMap", stem, image, masks_folder)
        sample_id = f"drishti_gs1/{split}/{stem}"
        samples.append(Sample(sample_id, sample_id, str(image), split, labels, masks))
    return samples


def _files_folder(root: Path) -> Path:
    for folder in (root, root / FILES_FOLDER, root / FILES_FOLDER / FILES_FOLDER):
        if any((folder / s / "Images").is_dir() for s in SET_FOLDERS.values()):
            return folder
    raise FileNotFoundError(
        f"Drishti-GS1: no Training/Images or Test/Images folder in {root} or {root / FILES_FOLDER}; "
        "point `root` at the unpacked Drishti-GS1_files folder"
    )


def _cdr(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    values = [float(v) for v in NUMBER.findall(path.read_text())]
    if not values:
        raise ValueError(f"Drishti-GS1: {path} holds no CDR values; restore it from the download")
    return {"cdr": float(np.mean(values))}


def _masks(soft_folder: Path, stem: str, image: Path, out_folder: Path) -> dict[str, str]:
    masks = {}
    for name, code in SOFT_MAPS.items():
        soft = next(iter(sorted(soft_folder.glob(f"{stem}_{code}*.png"))), None)
        if soft is not None:
            out = {name: out_folder / f"{stem}_{name}.png"}
            masks |= cached_masks(soft, out, partial(_majority, name=name, photo=image))
    return masks


def _majority(soft: Path, name: str, photo: Path) -> dict[str, np.ndarray]:
    """Pixels at least half the experts marked, at the photograph's size."""
    mask = Image.fromarray(read_gray(soft) >= MAJORITY)
    with Image.open(photo) as img:
        size = img.size  # reads the header only
    if mask.size != size:
        mask = mask.resize(size, Image.NEAREST)
    return {name: np.asarray(mask)}
