"""A task kind added from outside the library (no library file edited) trains end to end."""

from __future__ import annotations

import json
import textwrap

import pytest

from mtkd.config import load_config
from mtkd.stages import fit

pytestmark = pytest.mark.integration

PLUGIN = textwrap.dedent(
    """
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from torchmetrics import MetricCollection
    from torchmetrics.classification import BinaryAUROC

    from mtkd.tasks import Task, TaskSpec, register_task
    from mtkd.tasks.base import global_head


    @dataclass
    class BinarySpec(TaskSpec):
        label: str = ""


    @register_task("binary")
    class BinaryTask(Task):
        spec_class = BinarySpec
        default_temperature = 2.0
        monitor = ("auroc", "max")

        @property
        def out_channels(self):
            return 1

        def build_head(self, in_channels):
            return global_head(in_channels, 1)

        def target(self, ann):
            value = ann.labels.get(self.spec.label)
            return None if value is None else torch.tensor([float(value)])

        def empty_target(self, size):
            return torch.zeros(1)

        def loss(self, pred, target):
            return F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(1)

        def kd_loss(self, pred, teacher, temperature):
            soft = torch.sigmoid(teacher / temperature)
            return F.binary_cross_entropy_with_logits(pred / temperature, soft, reduction="none").mean(1)

        def metrics(self):
            return MetricCollection({"auroc": BinaryAUROC()})

        def update_metrics(self, metrics, pred, target, batch):
            metrics.update(torch.sigmoid(pred[:, 0]), target[:, 0].long())
    """
)


def test_plugin_task_kind_trains_and_distils(tiny, tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = ["plugins=[my_tasks]", "tasks.suspect={kind: binary, label: glaucoma}"]
    teacher_ckpt = fit(load_config("teacher", [*tiny(), *extra]))
    metrics = json.loads((teacher_ckpt.parent.parent / "metrics_val.json").read_text())["metrics"]
    assert 0.0 <= metrics["val/suspect/auroc"] <= 1.0
    assert "val/dr_grade/kappa" in metrics
    # The same plugin task is distilled online, the teacher loading it through the checkpoint.
    student_dir = tmp_path / "student"
    student = fit(
        load_config(
            "distill",
            [
                *tiny(**{"run.dir": str(student_dir)}),
                *extra,
                "kd=online",
                f"kd.teacher={teacher_ckpt}",
            ],
        )
    )
    assert student.exists()
