"""Albumentations pipelines: augmentation from config, and the cached-KD consistency rule.

Geometric transforms move the image, label masks, label points and every dense teacher map and
teacher point with the same random parameters; photometric transforms touch the image only.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import warnings
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.type_definitions import Targets
from albumentations.pytorch import ToTensorV2

# Evaluation pipelines have no geometric transform but still carry keypoints: expected, not a bug.
warnings.filterwarnings("ignore", message="Got processor for keypoints, but no transform")


def _build_one(spec: dict[str, Any], mask_interpolation: int | None = None) -> A.BasicTransform:
    spec = dict(spec)
    name = spec.pop("name", None)
    cls = getattr(A, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise ValueError(
            f"data.augment: {name!r} is not an albumentations transform; write entries like "
            "{name: HorizontalFlip, p: 0.5}"
        )
    accepts = "mask_interpolation" in inspect.signature(cls.__init__).parameters
    if mask_interpolation is not None and accepts:
        spec.setdefault("mask_interpolation", mask_interpolation)
    try:
        return cls(**spec)
    except Exception as exc:
        raise ValueError(f"data.augment: cannot build {name} with {spec}: {exc}") from None


def check_consistent(transforms: list[A.BasicTransform], needs: set[str]) -> None:
    """Refuse geometric transforms that cannot move teacher maps ("mask") or points
    ("keypoints") along with the image: the cached teacher output would no longer match."""
    required = {"mask": Targets.MASK, "keypoints": Targets.KEYPOINTS}
    for t in transforms:
        if isinstance(t, A.ImageOnlyTransform):
            continue
        targets = set(t._targets if isinstance(t._targets, tuple) else (t._targets,))
        missing = [n for n in sorted(needs) if required[n] not in targets]
        if missing:
            raise ValueError(
                f"augmentation {type(t).__name__} cannot transform teacher {', '.join(missing)} "
                "consistently with the image, so cached KD would train on mismatched targets. "
                "Remove it, use kd.mode=online, or cache augmented views with cache.views=K."
            )


#: the keypoint label fields of every pipeline: who owns each point (``pack``)
KEYPOINT_LABELS = ("point_owner", "point_name")


class Augmentation:
    """A configured pipeline (augmentations, normalisation, tensor conversion), called like an
    albumentations ``Compose`` on the image, label masks (their own, nearest, interpolation) and
    keypoints. Soft teacher maps are moved afterwards by ``move_maps``: bilinear twins of the
    geometric transforms replay the parameters the last call drew, so one random draw moves
    everything and label masks stay nearest-interpolated."""

    def __init__(
        self,
        augment: list[dict[str, Any]],
        mean: list[float],
        std: list[float],
        consistency: set[str] | None = None,
    ) -> None:
        transforms = [_build_one(s) for s in augment]
        if consistency:
            check_consistent(transforms, consistency)
        self.compose = A.Compose(
            [*transforms, A.Normalize(mean=mean, std=std), ToTensorV2(transpose_mask=True)],
            keypoint_params=A.KeypointParams(
                format="xy", label_fields=list(KEYPOINT_LABELS), remove_invisible=False
            ),
        )
        self._twins = [
            (t, _build_one(s, cv2.INTER_LINEAR))
            for t, s in zip(transforms, augment)
            if isinstance(t, A.DualTransform)
        ]
        #: whether the pipeline draws anything (an evaluation pipeline does not)
        self.draws = bool(transforms)

    def __call__(self, **data: Any) -> dict[str, Any]:
        if "keypoints" not in data:  # an image-only call (predict): no point to own
            empty = {name: [] for name in KEYPOINT_LABELS}
            data = {**data, "keypoints": np.zeros((0, 2), np.float32), **empty}
        return self.compose(**data)

    def set_random_seed(self, seed: int) -> None:
        """Seed the next call: one generator pair shared by every transform. albumentations'
        own ``set_random_seed`` gives each transform its own copy of the seed, so transforms of
        equal ``p`` would all fire together (or not at all)."""
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def follow_torch(self) -> None:
        """Seed the next call from torch's generator. Left alone, albumentations seeds itself
        from the OS (so ``run.seed`` is ignored) and forked workers copy one state; torch's
        generator is seeded by ``seed_everything``, per worker and rank by the DataLoader and
        Lightning, and saved in checkpoints."""
        self.set_random_seed(int(torch.randint(2**32, (), dtype=torch.int64)))

    def move_maps(self, maps: np.ndarray) -> np.ndarray:
        """H x W x C float maps moved like the last call's image, bilinear."""
        for drawn, twin in self._twins:
            params = drawn.get_applied_params()
            if params:
                maps = twin.apply_with_params(params, mask=maps)["mask"]
        return maps


def build_transform(
    augment: list[dict[str, Any]],
    mean: list[float],
    std: list[float],
    consistency: set[str] | None = None,
) -> Augmentation:
    """Augmentations (may be empty) + normalisation + tensor conversion. ``consistency`` lists
    the teacher target types that must follow geometry ("mask", "keypoints"); None skips the
    check."""
    return Augmentation(augment, mean, std, consistency)


def view_seed(sample_id: str, view: int) -> int:
    """The augmentation seed of cached view ``view`` of a sample (stored in the cache too)."""
    return int(hashlib.sha1(f"{sample_id}/{view}".encode()).hexdigest()[:8], 16)
