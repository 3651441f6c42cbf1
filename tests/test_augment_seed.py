"""Augmentation follows torch's seed: the same run.seed gives the same augmented samples, and
DataLoader workers draw distinct, reproducible streams (albumentations alone seeds from the OS)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from data_modules.datamodule import FundusDataModule, FundusDataset
from mtkd.modules.checkpoint import read_checkpoint
from mtkd.run_config import load_config
from mtkd.stages import fit
from mtkd.tasks import build_tasks
from tests.conftest import tiny_overrides


def _train_set(synth_root: Path, tmp_path: Path, repeat: int = 0) -> FundusDataset:
    """The augmented training set; ``repeat`` > 0 makes it one sample ``repeat`` times, so any
    difference between items is the augmentation's."""
    cfg = load_config("teacher", tiny_overrides(synth_root, tmp_path))
    dataset = FundusDataModule(cfg.data, build_tasks(dict(cfg.tasks))).dataset("train", train=True)
    if repeat:
        dataset.samples = dataset.samples[:1] * repeat
    return dataset


def _images(
    dataset: FundusDataset, seed: int, workers: int = 0, count: int | None = None
) -> list[torch.Tensor]:
    """The first ``count`` augmented images (all by default) after seeding torch with ``seed``."""
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=1, num_workers=workers)
    return [batch["image"][0] for batch in islice(loader, count)]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_same_torch_seed_gives_the_same_augmented_samples(synth_root, tmp_path):
    first = _images(_train_set(synth_root, tmp_path), seed=1, count=6)
    again = _images(_train_set(synth_root, tmp_path), seed=1, count=6)
    other = _images(_train_set(synth_root, tmp_path), seed=2, count=6)
    assert _equal(first, again)
    assert not _equal(first, other)


def test_dataloader_workers_draw_distinct_reproducible_streams(synth_root, tmp_path):
    # batch_size 1, two workers: worker 0 makes items 0, 2, 4, ... and worker 1 items 1, 3, 5, ...
    images = _images(_train_set(synth_root, tmp_path, repeat=8), seed=1, workers=2)
    assert not _equal(images[0::2], images[1::2]), "both workers replayed the same draws"
    assert _equal(images, _images(_train_set(synth_root, tmp_path, repeat=8), seed=1, workers=2))


def test_two_augmented_fits_of_one_seed_end_with_equal_weights(synth_root, tmp_path):
    weights = []
    for name in ("a", "b"):
        cfg = load_config("teacher", tiny_overrides(synth_root, tmp_path / name, **{"run.seed": 3}))
        assert list(cfg.data.augment), "the test needs augmentation on"
        weights.append(read_checkpoint(fit(cfg))["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.unit
def test_transforms_of_one_call_draw_independently_under_a_seed():
    """A replayed view's seed (and each follow_torch draw) seeds one generator shared by every
    transform: with albumentations' own set_random_seed, two flips of p=0.5 got equal seeds and
    fired together or not at all."""
    import numpy as np

    from data_modules.transforms import build_transform

    flips = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}]
    transform = build_transform(flips, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[0, 0] = 255  # the corner shows which flips fired
    outcomes = set()
    for seed in range(40):
        transform.set_random_seed(seed)
        out = transform(image=image)["image"][0].numpy()
        corner = tuple(int(i) for i in np.argwhere(out > 0)[0])
        outcomes.add(corner)
    assert outcomes == {(0, 0), (0, 7), (7, 0), (7, 7)}
