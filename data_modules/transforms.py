"""Albumentations pipelines: augmentation from config, and the cached-KD consistency rule.

Geometric transforms move the image, label masks, label points and every dense teacher map and
teacher point with the same random parameters; photometric transforms touch the image only.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from typing import Any

import albumentations as A
import cv2
from albumentations.core.type_definitions import Targets
from albumentations.pytorch import ToTensorV2

# Evaluation pipelines have no geometric transform but still carry keypoints: expected, not a bug.
warnings.filterwarnings("ignore", message="Got processor for keypoints, but no transform")


def _build_one(spec: dict[str, Any], smooth_masks: bool) -> A.BasicTransform:
    spec = dict(spec)
    name = spec.pop("name", None)
    cls = getattr(A, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise ValueError(
            f"data.augment: {name!r} is not an albumentations transform; write entries like "
            "{name: HorizontalFlip, p: 0.5}"
        )
    if smooth_masks and "mask_interpolation" in inspect.signature(cls.__init__).parameters:
        spec.setdefault("mask_interpolation", cv2.INTER_LINEAR)
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


def build_transform(
    augment: list[dict[str, Any]],
    mean: list[float],
    std: list[float],
    extra_masks: list[str] = (),
    consistency: set[str] | None = None,
) -> A.Compose:
    """Augmentations (may be empty) + normalisation + tensor conversion.

    ``extra_masks`` are additional float mask targets (teacher maps). ``consistency`` lists the
    teacher target types that must follow geometry ("mask", "keypoints"); None skips the check.
    """
    transforms = [_build_one(s, smooth_masks=bool(extra_masks)) for s in augment]
    if consistency:
        check_consistent(transforms, consistency)
    return A.Compose(
        [*transforms, A.Normalize(mean=mean, std=std), ToTensorV2(transpose_mask=True)],
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
        additional_targets={name: "mask" for name in extra_masks},
    )


def view_seed(sample_id: str, view: int) -> int:
    """The augmentation seed of cached view ``view`` of a sample (stored in the cache too)."""
    return int(hashlib.sha1(f"{sample_id}/{view}".encode()).hexdigest()[:8], 16)
