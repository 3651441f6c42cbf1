"""One augmentation call moves a sample's labels and teacher outputs: hand-made arrays through
``data_modules.pack.augment``."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest

from data_modules.pack import augment, carriers, resize_maps, teacher_needs
from data_modules.transforms import build_transform

pytestmark = pytest.mark.unit

FLIP = [{"name": "HorizontalFlip", "p": 1.0}]
ROTATE = [{"name": "Affine", "rotate": [30, 30], "p": 1.0}]
SIZE = 16


class Kind:
    def __init__(self, teacher_spatial: str) -> None:
        self.teacher_spatial = teacher_spatial


def square_mask() -> np.ndarray:
    """A rectangle and a 1 px line: bilinear + threshold would thin or cut the line."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:12, 3:7] = 1
    mask[2:14, 10] = 1
    return mask


def image() -> np.ndarray:
    return np.zeros((SIZE, SIZE, 3), np.uint8)


def test_a_flip_moves_label_and_teacher_points_to_their_owners() -> None:
    teacher = {"marks": np.array([[0.25, 0.5], [0.75, 0.125]], np.float32)}
    moved = augment(
        build_transform(FLIP, [0.0] * 3, [1.0] * 3),
        image(),
        {},
        {"fovea": (0.5, 0.25), "disc": (0.125, 0.75)},
        teacher,
        {"marks": "points"},
        follow=True,
    )
    assert sorted(moved.points) == ["disc", "fovea"]
    assert moved.points["fovea"] == pytest.approx((0.5, 0.25))
    assert moved.points["disc"] == pytest.approx((0.875, 0.75))
    np.testing.assert_allclose(moved.teacher["marks"], [[0.75, 0.5], [0.25, 0.125]], atol=1e-6)


def test_label_masks_stay_binary_and_nearest_while_teacher_maps_are_bilinear() -> None:
    rotate = build_transform(ROTATE, [0.0] * 3, [1.0] * 3)
    soft = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(1, SIZE, SIZE)
    moved = augment(
        rotate, image(), {"disc": square_mask()}, {}, {"maps": soft}, {"maps": "mask"}, True
    )
    mask = moved.masks["disc"]
    assert set(np.unique(mask)) == {0.0, 1.0}
    # Exactly what albumentations' nearest interpolation gives, not a thresholded bilinear one.
    nearest = A.Affine(rotate=(30, 30), p=1.0, mask_interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(mask, nearest(image=image(), mask=square_mask())["mask"])
    # The soft map is interpolated: values between the grid's, where nearest would copy one.
    inside = moved.teacher["maps"][0][4:12, 4:12].ravel()
    off_grid = np.abs(inside[:, None] - soft.ravel()[None, :]).min(axis=1) > 1e-6
    assert off_grid.mean() > 0.5
    assert moved.teacher["maps"].shape == (1, SIZE, SIZE)


def test_teacher_maps_are_resized_once_and_stay_put_when_not_following() -> None:
    small = np.arange(16, dtype=np.float32).reshape(1, 4, 4) / 15
    moved = augment(
        build_transform(FLIP, [0.0] * 3, [1.0] * 3),
        image(),
        {},
        {},
        {"maps": small, "grade": np.array([1.0, -1.0], np.float32)},
        {"maps": "mask", "grade": "none"},
        follow=False,
    )
    np.testing.assert_allclose(moved.teacher["maps"], resize_maps(small, SIZE))
    np.testing.assert_array_equal(moved.teacher["grade"], [1.0, -1.0])
    followed = augment(
        build_transform(FLIP, [0.0] * 3, [1.0] * 3),
        image(),
        {},
        {},
        {"maps": small},
        {"maps": "mask"},
        follow=True,
    )
    np.testing.assert_allclose(followed.teacher["maps"], resize_maps(small, SIZE)[:, :, ::-1])


def test_resize_maps_is_bilinear() -> None:
    maps = np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32)
    row = resize_maps(maps, 4)[0, 0]
    np.testing.assert_allclose(row, [0.0, 0.25, 0.75, 1.0])


def test_unknown_carrier_lists_the_valid_ones_and_needs_follow_the_carriers() -> None:
    with pytest.raises(
        ValueError, match=r"teacher_spatial='heat'.*\['grid', 'mask', 'none', 'points'\]"
    ):
        carriers({"t": Kind("heat")})
    found = carriers({"a": Kind("mask"), "b": Kind("points"), "c": Kind("none")})
    assert teacher_needs(found) == {"mask", "keypoints"}
