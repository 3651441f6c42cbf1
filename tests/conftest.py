"""Shared fixtures: one small synthetic dataset per session and overrides for tiny, fast runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: the shared real data (read-only), as in ../shared/data/README.md
DATA_DIR = Path(os.environ.get("MTKD_DATA_DIR", REPO.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One OpenMP thread (set before torch loads): on a 2-core machine shared with other jobs, torch's
# two threads spin-wait on each other and a tiny training run takes several times longer.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """48 synthetic images (24 patients) at 128 px, generated once per test session."""
    from data_modules.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(root, n=48, image_size=128, seed=0, progress=False)
    return root


def tiny_overrides(synth_root: Path, run_dir: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long run: 64 px, tiny student-sized network, one epoch."""
    values = {
        "data.sources.synthetic.root": str(synth_root),
        "data.sources.synthetic.options": "{n: 48, image_size: 128, seed: 0}",
        "data.image_size": 64,
        "data.batch_size": 8,
        "data.eval_batch_size": 16,
        "data.preprocess.cache_dir": str(run_dir / "preprocessed"),
        "model": "student",
        "logger": "none",
        "run.dir": str(run_dir),
        "trainer.max_epochs": 1,
        "trainer.enable_progress_bar": False,
        "trainer.enable_checkpointing": True,
        "kd.cache_dir": str(run_dir / "cache"),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny(synth_root, tmp_path):
    """``tiny(**extra)`` -> override list for a fast run in this test's tmp dir."""

    def make(**extra: object) -> list[str]:
        return tiny_overrides(synth_root, tmp_path, **extra)

    return make


def real_dataset(name: str) -> Path:
    """Folder of a shared real dataset, or skip the test with the reason."""
    root = DATA_DIR / name
    if not root.is_dir():
        pytest.skip(f"real data {root} is absent; set MTKD_DATA_DIR to the shared data folder")
    return root
