"""RetinaMNIST (MedMNIST v2): 28x28 fundus thumbnails with DR grades, in one official .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_modules.io import npz_ref
from data_modules.samples import SPLITS, Sample, register_source


@register_source("retinamnist")
def read_retinamnist(root: Path, file: str = "retinamnist.npz") -> list[Sample]:
    """``<root>/retinamnist.npz`` (or ``root`` is the file) with arrays ``{train,val,test}_images``
    (N,28,28,3) uint8 and ``{train,val,test}_labels`` (N,1) -> label dr_grade, official splits.
    Images stay in the file: samples reference them with ``npz_ref``.
    """
    path = root if root.is_file() else root / file
    if not path.is_file():
        raise FileNotFoundError(
            f"RetinaMNIST: expected {file} (the official MedMNIST file) in {root}; download it "
            "or set the option `file`"
        )
    keys = [f"{split}_{part}" for split in SPLITS for part in ("images", "labels")]
    with np.load(path, mmap_mode="r") as arrays:
        missing = [k for k in keys if k not in arrays.files]
        if missing:
            raise ValueError(f"RetinaMNIST: {path} lacks arrays {missing}; it has {arrays.files}")
        labels = {split: np.asarray(arrays[f"{split}_labels"]).reshape(-1) for split in SPLITS}
    samples = []
    for split in SPLITS:
        for index, grade in enumerate(labels[split].tolist()):
            sample_id = f"retinamnist/{split}/{index}"
            image = npz_ref(path, f"{split}_images", index)
            samples.append(Sample(sample_id, sample_id, image, split, {"dr_grade": float(grade)}))
    return samples
