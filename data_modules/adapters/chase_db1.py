"""CHASE_DB1 (Child Heart and Health Study in England): vessel masks by two observers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.adapters._common import cache_dir, cached_masks, existing, image_index
from data_modules.samples import Sample, register_source

IMAGE_NAME = re.compile(r"Image_(\d+)[LR]")
FOV_RED_THRESHOLD = 20  # red channel (0..255) above which a pixel is inside the field of view


@register_source("chase_db1")
def read_chase_db1(root: Path, fov_dir: str | None = None) -> list[Sample]:
    """A flat folder of ``Image_NN{L,R}.jpg`` with ``Image_NN{L,R}_1stHO.png`` -> mask vessels
    and ``Image_NN{L,R}_2ndHO.png`` -> vessels_2nd. CHASE_DB1 ships no field-of-view mask: one is
    derived from the photograph (red channel threshold, largest component, holes filled) and
    written once into ``fov_dir`` (default ``<MTKD_CACHE_DIR>/fov/chase_db1-<root digest>``,
    ``_common.cache_dir``) -> mask fov.
    No official split; patient = the child NN (both eyes).
    """
    images = {s: p for s, p in image_index(root).items() if IMAGE_NAME.fullmatch(s)}
    if not images:
        raise FileNotFoundError(
            f"CHASE_DB1: no Image_NN{{L,R}}.jpg photographs in {root}; point `root` at the "
            "unpacked CHASE_DB1 folder"
        )
    fov_folder = cache_dir(root, fov_dir, "fov", "chase_db1")
    samples = []
    for stem, image in images.items():
        masks = existing(
            {"vessels": root / f"{stem}_1stHO.png", "vessels_2nd": root / f"{stem}_2ndHO.png"}
        )
        masks |= cached_masks(image, {"fov": fov_folder / f"{stem}_fov.png"}, _fov_mask)
        child = IMAGE_NAME.fullmatch(stem).group(1)
        sample_id = f"chase_db1/{stem}"
        samples.append(Sample(sample_id, f"chase_db1/{child}", str(image), None, masks=masks))
    return samples


def _fov_mask(photo: Path) -> dict[str, np.ndarray]:
    """Field-of-view mask of a fundus photograph: bright red channel, largest blob, no holes."""
    with Image.open(photo) as img:
        red = np.asarray(img.convert("RGB"))[..., 0]
    return {"fov": _fill_holes(_largest_component(red > FOV_RED_THRESHOLD))}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels = _components(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax() if sizes.any() else mask


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions that do not touch the border become foreground."""
    background = _components(~mask)
    border = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    return ~np.isin(background, border[border > 0])


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = outside ``mask``), by union-find over row runs."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = (a.tolist() for a in np.nonzero(edges == 1))
    ends = np.nonzero(edges == -1)[1].tolist()
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(height + 1)).tolist()
    for r in range(1, height):
        i, j = row_first[r - 1], row_first[r]
        while i < row_first[r] and j < row_first[r + 1]:
            if starts[i] < ends[j] and starts[j] < ends[i]:
                parent[find(i)] = find(j)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros((height, width), np.int32)
    for k, (r, start, end) in enumerate(zip(rows, starts, ends)):
        labels[r, start:end] = find(k) + 1
    return labels
