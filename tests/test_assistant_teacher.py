"""Teacher assistants (Xu et al. 2021): an already-distilled student checkpoint teaches the next,
smaller student through the same ``cache-teacher`` / ``distill`` commands as a teacher does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_modules.datamodule import FundusDataModule
from mtkd.kd.cache import TeacherCache
from mtkd.modules.student import StudentModule
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, fit
from tests.conftest import EXACT, tiny_overrides

pytestmark = pytest.mark.integration


def test_a_distilled_student_teaches_the_next_student(synth_root, tmp_path, runs):
    """The cache holds the assistant's own outputs (its network run by the student module Lightning
    loads, not by the teacher code path; stored in the task's cache form), records the assistant as every task's teacher,
    and a slimmer student distils from it."""
    assistant = str(runs.student)
    overrides = tiny_overrides(
        synth_root,
        tmp_path / "pupil",
        **{
            "kd.cache_dir": tmp_path / "cache",
            "cache.teacher": f"[{assistant}]",
            "model.decoder_channels": "[16,8,8,8,8]",
            "data.augment": "[]",
        },
    )
    cfg = load_config("distill", [*overrides, *EXACT])
    cache_teacher(cfg)

    module = StudentModule.load_from_checkpoint(assistant, map_location="cpu", weights_only=True)
    module.eval()
    cache = TeacherCache(cfg.kd.cache_dir, module.tasks)
    dataset = FundusDataModule(cfg.data, module.tasks).dataset("train")
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        with torch.no_grad():
            expected = module(item["image"][None])
        cached = cache.get(item["sample_id"])
        for name, task in module.tasks.items():
            size = tuple(item["image"].shape[-2:])
            stored = task.combine_teachers(
                [task.teacher_at(task.teacher_output(expected[name]), size)]
            )
            assert np.allclose(cached[name], stored[0].numpy(), atol=1e-5), name

    recorded = json.loads((tmp_path / "cache" / "fingerprint.json").read_text())
    paths = {t["path"] for taught in recorded["task_teachers"].values() for t in taught}
    assert paths == {assistant}

    best = fit(load_config("distill", [*overrides, *EXACT]))
    pupil = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    parent = module.state_dict()
    assert sum(v.numel() for v in pupil.values()) < sum(v.numel() for v in parent.values())
