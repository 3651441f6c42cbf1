"""Dense teacher maps keep thin structures: the cache stores them at the working size by default,
a per-task size can shrink one task's maps, and cache-teacher warns where a size loses
structure (``mtkd.kd.fidelity``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mtkd.config import ConfigError
from mtkd.kd.fidelity import KEPT_DICE_WARNING, MapFidelity
from mtkd.kd.storage import CacheStorage, cache_storage
from mtkd.run_config import load_config
from mtkd.tasks import build_tasks

pytestmark = pytest.mark.unit

SIZE = 96


@pytest.fixture(scope="module")
def anatomy():
    return build_tasks({"anatomy": {"kind": "segmentation", "classes": ["vessels", "optic_disc"]}})[
        "anatomy"
    ]


def teacher_maps(batch: int = 4) -> torch.Tensor:
    """Confident teacher maps at 96 px: channel 0 thin vessels (2 px wide lines), channel 1 an
    optic disc (radius 14 px)."""
    maps = torch.full((batch, 2, SIZE, SIZE), 0.02)
    for b in range(batch):
        for k in range(4):
            row = 10 + 20 * k + b
            maps[b, 0, row : row + 2, 5:90] = 0.97
            maps[b, 0, 5:90, row : row + 2] = 0.97
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    maps[:, 1][:, (yy - 60) ** 2 + (xx - 40) ** 2 <= 14**2] = 0.97
    return maps


def kept(task, storage: CacheStorage) -> dict[int, float]:
    fidelity = MapFidelity()
    maps = teacher_maps()
    fidelity.update("anatomy", task, maps, task.encode_cache(maps, storage.for_task("anatomy")))
    return fidelity.kept_dice().get("anatomy", {})


def test_working_size_cache_keeps_thin_vessels_exactly(anatomy):
    """uint8 maps at the working size lose nothing once thresholded: the round trip through
    encode/decode gives back the teacher's mask pixel for pixel."""
    maps = teacher_maps()
    stored = anatomy.encode_cache(maps, CacheStorage(dense_size=SIZE))
    back = torch.from_numpy(anatomy.decode_cache(stored))
    assert torch.equal(back > 0.5, maps > 0.5)
    assert kept(anatomy, CacheStorage(dense_size=SIZE)) == {}  # nothing reduced, nothing counted


def test_a_third_of_the_working_size_loses_vessels_but_keeps_the_disc(anatomy):
    """The old default (32 px maps of a 96 px run): 2 px vessels fade below 0.5 on the way
    down and back up (Dice about 0.6); a 28 px disc survives."""
    dice = kept(anatomy, CacheStorage(dense_size=32))
    assert dice[0] < 0.7 < KEPT_DICE_WARNING < dice[1]


def test_cache_teacher_warns_with_the_setting_that_fixes_it(anatomy, caplog):
    fidelity = MapFidelity()
    maps = teacher_maps()
    fidelity.update("anatomy", anatomy, maps, anatomy.encode_cache(maps, CacheStorage(32)))
    with caplog.at_level(logging.INFO, logger="mtkd"):
        fidelity.report({"anatomy": anatomy})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "anatomy maps stored at 32 px keep vessels at Dice" in warnings[0]
    assert "cache.task_dense_size.anatomy=96" in warnings[0]


def test_per_task_size_overrides_the_default():
    storage = CacheStorage(dense_size=96, task_dense_size={"lesions": 48})
    assert storage.for_task("lesions").dense_size == 48
    assert storage.for_task("anatomy").dense_size == 96


def test_default_dense_size_is_the_working_size():
    cfg = load_config("distill", ["data.image_size=80"])
    assert cfg.cache.dense_size is None
    storage = cache_storage(cfg)
    assert storage.for_task("anatomy").dense_size == 80


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cache.dense_size=128", r"cache.dense_size=128 is out of range: it must be in \[1, data"),
        ("cache.task_dense_size={anatomy: 0}", r"cache.task_dense_size.anatomy=0 is out of range"),
        ("cache.task_dense_size={vessels: 32}", r"names unknown tasks \['vessels'\]"),
    ],
)
def test_bad_dense_sizes_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("distill", ["data.image_size=96", override])


def test_bytes_per_sample_at_the_working_size(anatomy):
    """What the default costs: channels x size^2 bytes per map (uint8)."""
    shape = anatomy.cache_shape(CacheStorage(dense_size=SIZE))
    assert np.prod(shape) == 2 * SIZE * SIZE
