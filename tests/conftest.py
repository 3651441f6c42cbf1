"""Shared fixtures: one small synthetic dataset per session, overrides for tiny, fast runs, and
one tiny trained teacher + KD student reused by every module that only reads trained runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parent.parent
#: the shared real data (read-only), as in ../shared/data/README.md
DATA_DIR = Path(os.environ.get("MTKD_DATA_DIR", REPO.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One OpenMP thread (set before torch loads): on a 2-core machine shared with other jobs, torch's
# two threads spin-wait on each other and a tiny training run takes several times longer.
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: float32 teacher-cache storage at the run's size, so cached outputs compare to float rounding
EXACT = ["cache.dense_dtype=float32", "cache.logits_dtype=float32", "cache.dense_size=64"]
#: the first bytes of every PNG file
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the tiny student's decoder is slimmer than the (student-sized) tiny teacher's: ratios are > 1
STUDENT_DECODER = "[32,16,8,8,8]"


@pytest.fixture(scope="session", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread for these toy-sized runs, even when OMP_NUM_THREADS was set higher:
    on a CPU shared with other processes, two spinning OpenMP threads per process made them over
    ten times slower. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def distill_cfg(synth_root: Path, run_dir: Path, *extra: str) -> DictConfig:
    """A tiny distill config (``tiny_overrides``) with ``extra`` overrides applied last."""
    from mtkd.run_config import load_config

    return load_config("distill", [*tiny_overrides(synth_root, run_dir), *extra])


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


@dataclass(frozen=True)
class TinyRuns:
    teacher_dir: Path
    student_dir: Path
    teacher: Path
    student: Path


def trained_runs(synth_root: Path, base: Path) -> TinyRuns:
    """Teacher, teacher cache and KD student at 64 px for one epoch, both evaluated on the test
    split. Kept on disk under ``base`` (the session's temp root) so every test module reuses it."""
    from mtkd.run_config import load_config
    from mtkd.stages import cache_teacher, evaluate, fit

    runs = TinyRuns(
        base / "teacher",
        base / "student",
        base / "teacher" / "checkpoints" / "best.ckpt",
        base / "student" / "checkpoints" / "best.ckpt",
    )
    if (runs.student_dir / "metrics_test.json").is_file():
        return runs
    fit(load_config("teacher", tiny_overrides(synth_root, runs.teacher_dir)))
    student = tiny_overrides(
        synth_root,
        runs.student_dir,
        **{
            "kd.cache_dir": base / "cache",
            "cache.teacher": f"[{runs.teacher}]",
            "model.decoder_channels": STUDENT_DECODER,
        },
    )
    cache_teacher(load_config("distill", student))
    fit(load_config("distill", student))
    evaluate(str(runs.teacher), "test", [])
    evaluate(str(runs.student), "test", [])
    return runs


@pytest.fixture(scope="session")
def runs(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    """The session's tiny teacher and KD student (:func:`trained_runs`), trained on first use."""
    return trained_runs(synth_root, tmp_path_factory.getbasetemp() / "tiny_runs")
