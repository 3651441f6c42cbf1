"""Adapters on the shared real data (IDRiD parts B and C, RetinaMNIST); skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_modules.io import load_image
from data_modules.samples import read_source
from tests.conftest import real_dataset

pytestmark = pytest.mark.realdata


def test_idrid_grading_and_localisation():
    samples = read_source("idrid", real_dataset("idrid"))
    splits = [s.split for s in samples]
    assert (splits.count("train"), splits.count("test")) == (413, 103)
    assert all(s.sample_id == f"idrid/{s.split}/{Path(s.image).stem}" for s in samples)
    assert all(s.labels["dr_grade"] in {0, 1, 2, 3, 4} for s in samples)
    assert all(s.labels["dme_risk"] in {0, 1, 2} for s in samples)
    assert all(set(s.points) == {"optic_disc", "fovea"} for s in samples)
    assert all(0 <= x < 4288 and 0 <= y < 2848 for s in samples for x, y in s.points.values())
    image = load_image(samples[0].image, draft_size=512)
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] / image.shape[0] == pytest.approx(4288 / 2848, rel=0.01)


def test_retinamnist_official_splits():
    samples = read_source("retinamnist", real_dataset("retinamnist"))
    splits = [s.split for s in samples]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (1080, 120, 400)
    assert {s.labels["dr_grade"] for s in samples} == {0, 1, 2, 3, 4}
    assert load_image(samples[-1].image).shape == (28, 28, 3)
