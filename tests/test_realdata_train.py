"""One tiny epoch and a test-split evaluation on the shared real data with ``data=idrid
tasks=idrid`` and ``data=retinamnist tasks=retinamnist``; skipped when the data is absent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mtkd.config import load_config
from mtkd.stages import evaluate, fit
from tests.conftest import real_dataset

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def train_and_test(name: str, tmp_path: Path) -> dict[str, float]:
    """Teacher-stage fit on two training batches, then ``evaluate`` on the whole test split."""
    overrides = [
        f"data={name}",
        f"tasks={name}",
        f"data.sources.{name}.root={real_dataset(name)}",
        "data.image_size=64",
        f"data.preprocess.cache_dir={tmp_path / 'preprocessed'}",
        "model=student",
        "logger=none",
        f"run.dir={tmp_path / 'run'}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
    ]
    best = fit(load_config("teacher", overrides))
    metrics = evaluate(str(best), "test", [])
    written = json.loads((tmp_path / "run" / "metrics_test.json").read_text())
    assert written["split"] == "test" and written["metrics"] == pytest.approx(metrics)
    return metrics


def test_idrid_trains_and_evaluates(tmp_path: Path):
    metrics = train_and_test("idrid", tmp_path)
    for task in ("dr_grade", "dme_risk"):
        assert 0.0 <= metrics[f"test/{task}/acc"] <= 1.0
        assert -1.0 <= metrics[f"test/{task}/kappa"] <= 1.0
    # Distances in original 4288x2848 pixels: positive, and below the photograph's diagonal.
    assert 0.0 < metrics["test/landmarks/dist_px"] < math.hypot(4288, 2848)


def test_retinamnist_trains_and_evaluates(tmp_path: Path):
    metrics = train_and_test("retinamnist", tmp_path)
    assert 0.0 <= metrics["test/dr_grade/acc"] <= 1.0
    assert 0.0 <= metrics["test/dr_grade/auroc"] <= 1.0
