"""DRIVE (Digital Retinal Images for Vessel Extraction), as officially released."""

from __future__ import annotations

from pathlib import Path

from data_modules.adapters._common import existing, image_index
from data_modules.samples import Sample, register_source

SET_FOLDERS = {"train": "training", "test": "test"}


@register_source("drive")
def read_drive(root: Path) -> list[Sample]:
    """``{training,test}/images/NN_{training,test}.tif`` with ``1st_manual/NN_manual1.gif`` ->
    mask vessels, ``2nd_manual/NN_manual2.gif`` (test only) -> vessels_2nd and
    ``mask/NN_{training,test}_mask.gif`` -> fov. Manual annotations absent from a download
    (often the test set's) simply leave those masks out.
    """
    splits = [s for s, folder in SET_FOLDERS.items() if (root / folder / "images").is_dir()]
    if not splits:
        raise FileNotFoundError(
            f"DRIVE: expected training/images and/or test/images in {root}; point `root` at the "
            "unpacked DRIVE folder"
        )
    samples = []
    for split in splits:
        folder = root / SET_FOLDERS[split]
        for stem, image in image_index(folder / "images").items():
            number = stem.split("_")[0]
            candidates = {
                "vessels": folder / "1st_manual" / f"{number}_manual1.gif",
                "vessels_2nd": folder / "2nd_manual" / f"{number}_manual2.gif",
                "fov": folder / "mask" / f"{stem}_mask.gif",
            }
            sample_id = f"drive/{split}/{stem}"
            samples.append(
                Sample(sample_id, sample_id, str(image), split, masks=existing(candidates))
            )
    return samples
