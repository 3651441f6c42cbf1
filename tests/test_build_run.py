"""A run's collaborators are built once (``stages.build_run``): a distill run reads and pre-scans
its samples once, and its student and data module share the one checked teacher cache."""

from __future__ import annotations

from collections import Counter

import pytest

from data_modules import datamodule
from mtkd.run_config import load_config
from mtkd.stages import build_run, fit
from tests.conftest import STUDENT_DECODER, tiny_overrides

pytestmark = pytest.mark.integration


def student_cfg(runs, synth_root, run_dir, **extra):
    """The session's tiny KD student config, reading the session's teacher cache."""
    overrides = {
        "kd.cache_dir": runs.teacher_dir.parent / "cache",
        "cache.teacher": f"[{runs.teacher}]",
        "model.decoder_channels": STUDENT_DECODER,
        **extra,
    }
    return load_config("distill", tiny_overrides(synth_root, run_dir, **overrides))


def test_a_distill_run_reads_and_prescans_its_samples_once(runs, synth_root, tmp_path, monkeypatch):
    calls: Counter[str] = Counter()
    for name in ("read_sources", "drop_bad_images"):
        real = getattr(datamodule, name)

        def counted(*args, real=real, name=name, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(datamodule, name, counted)
    # the cache's check, prepare_data and setup each loaded the samples before (3 pre-scans)
    fit(student_cfg(runs, synth_root, tmp_path, **{"trainer.fast_dev_run": "true"}))
    assert calls == {"read_sources": 1, "drop_bad_images": 1}


def test_student_and_data_module_share_one_checked_cache(runs, synth_root, tmp_path):
    module, dm = build_run(student_cfg(runs, synth_root, tmp_path))
    assert module.teacher_source.cache is dm.teacher is not None
    assert module.tasks is dm.tasks  # the tasks too are built once
    teacher, teacher_dm = build_run(load_config("teacher", tiny_overrides(synth_root, tmp_path)))
    assert teacher_dm.teacher is None and teacher.tasks is teacher_dm.tasks
