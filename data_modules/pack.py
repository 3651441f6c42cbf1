"""One sample through one augmentation call: label masks, label points and the teacher's outputs
packed in, moved by the same random draw, and unpacked by owner.

Each task's ``teacher_spatial`` says how its teacher output follows the image (``CARRIERS``):
dense maps are resized once to the working size (bilinear) and, when they follow, moved bilinear
(``Augmentation.move_maps``); coarse grids (a teacher's stride-s feature map) stay at their size
and move as their cells (``move_grid``); points ride as keypoints whose owner is an albumentations
keypoint label field; anything else is left as it is. Label masks keep the transforms' own
(nearest) interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_modules.transforms import Augmentation

#: the values of ``teacher_spatial`` -> the albumentations target a geometric transform must
#: support to move that teacher output with the image: "none" a global output (logits, values),
#: not moved; "mask" C x h x w maps, resized to the working size and moved bilinear; "grid"
#: C x h x w maps whose side divides the working size, moved at their own size (``move_grid``);
#: "points" K x 2 normalised points, moved as keypoints
CARRIERS: dict[str, str | None] = {
    "none": None,
    "mask": "mask",
    "grid": "mask",
    "points": "keypoints",
}
#: ``point_owner`` of label points; a teacher point's owner is its task's name
LABEL = ""


@dataclass
class Moved:
    """One augmented sample: image tensor, label masks {0,1} H x W, normalised label points and
    teacher outputs at the working size (maps C x H x W, points K x 2)."""

    image: torch.Tensor
    masks: dict[str, np.ndarray]
    points: dict[str, tuple[float, float]]
    teacher: dict[str, np.ndarray]


def carriers(tasks: dict[str, Any]) -> dict[str, str]:
    """task -> its ``teacher_spatial``, refused unless it is one of ``CARRIERS``."""
    found = {name: task.teacher_spatial for name, task in tasks.items()}
    for name, carrier in found.items():
        if carrier not in CARRIERS:
            raise ValueError(
                f"task {name!r}: teacher_spatial={carrier!r} is not a way a teacher output can "
                f"follow augmentation; use one of {sorted(CARRIERS)}"
            )
    return found


def teacher_needs(carried: dict[str, str]) -> set[str]:
    """The albumentations targets the cached teacher outputs need (``check_consistent``)."""
    return {CARRIERS[c] for c in carried.values()} - {None}


def resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """C x h x w float maps -> C x size x size float32 (bilinear): the one resize path."""
    if maps.shape[-1] == size:
        return maps.astype(np.float32)
    return np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.BILINEAR))
            for m in maps
        ]
    )


def move_grid(transform: Augmentation, grid: np.ndarray, size: int) -> np.ndarray:
    """A C x h x w grid (h divides ``size``) moved like the last call's image: each cell spread
    over the size / h pixels it covers, moved bilinear (``Augmentation.move_maps``), then each
    cell the mean of its pixels. A flip or no move gives back the grid's own values exactly."""
    cell = size // grid.shape[-1]
    pixels = grid.astype(np.float32).repeat(cell, axis=1).repeat(cell, axis=2)
    moved = transform.move_maps(pixels.transpose(1, 2, 0)).transpose(2, 0, 1)
    channels, side = grid.shape[0], grid.shape[-1]
    return moved.reshape(channels, side, cell, side, cell).mean(axis=(2, 4))


def augment(
    transform: Augmentation,
    image: np.ndarray,
    masks: dict[str, np.ndarray],
    points: dict[str, tuple[float, float]],
    teacher: dict[str, np.ndarray],
    carried: dict[str, str],
    follow: bool,
) -> Moved:
    """Move ``image`` (size x size x 3) and its labels with one call of ``transform``; the
    teacher outputs follow when ``follow`` (a cached output of the unaugmented image), and stay
    as they are otherwise (a replayed view the teacher saw augmented). Points are normalised."""
    size = image.shape[0]
    teacher = {n: resize_maps(v, size) if carried[n] == "mask" else v for n, v in teacher.items()}
    moving = {n: v for n, v in teacher.items() if follow and carried[n] == "points"}
    uv = [*points.values(), *(p for v in moving.values() for p in v)]
    owners = [LABEL] * len(points) + [n for n, v in moving.items() for _ in v]
    names = [*points, *(str(i) for v in moving.values() for i in range(len(v)))]
    pixels = np.asarray([(u * size - 0.5, v * size - 0.5) for u, v in uv], np.float32)
    out = transform(
        image=image,
        masks=list(masks.values()),
        keypoints=pixels.reshape(-1, 2),
        point_owner=owners,
        point_name=names,
    )
    label_points: dict[str, tuple[float, float]] = {}
    teacher_points = {n: np.zeros((len(v), 2), np.float32) for n, v in moving.items()}
    for (x, y), owner, name in zip(
        np.asarray(out["keypoints"])[:, :2], out["point_owner"], out["point_name"]
    ):
        moved = ((float(x) + 0.5) / size, (float(y) + 0.5) / size)
        if owner == LABEL:
            label_points[name] = moved
        else:
            teacher_points[owner][int(name)] = moved
    if follow:
        for n, v in teacher.items():
            if carried[n] == "mask":
                teacher[n] = transform.move_maps(v.transpose(1, 2, 0)).transpose(2, 0, 1)
            elif carried[n] == "grid":
                teacher[n] = move_grid(transform, v, size)
    teacher.update(teacher_points)
    return Moved(
        image=out["image"],
        masks={n: (np.asarray(m) >= 0.5).astype(np.float32) for n, m in zip(masks, out["masks"])},
        points=label_points,
        teacher=teacher,
    )
