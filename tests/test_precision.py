"""Mixed precision on CPU: bf16-mixed teacher and student training steps compute every
supervised and KD loss in float32 outside autocast (the forward itself runs in bfloat16), log
finite float32 losses, and a loss that turns NaN stops the run with an explanation."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd.kd.teacher_source import OnlineTeacher
from mtkd.modules import common, student
from mtkd.run_config import load_config
from mtkd.stages import fit
from mtkd.tasks.regression import RegressionTask

pytestmark = pytest.mark.integration

BF16 = {
    "trainer.precision": "bf16-mixed",
    "trainer.limit_train_batches": 2,
    "trainer.limit_val_batches": 1,
    "trainer.num_sanity_val_steps": 0,
    "data.batch_size": 4,
    "data.eval_batch_size": 4,
}


@pytest.fixture
def spy(monkeypatch):
    """Records each loss evaluated through ``fp32`` (kind, input dtypes, autocast state inside,
    result dtype) and each ``train/...`` value the modules log."""
    record: dict[str, list] = {"losses": [], "logged": [], "in_kd": [], "sources": []}
    real_fp32, real_log = common.fp32, common.MultiTaskModule.log
    real_kd_losses = student.StudentModule.kd_losses

    def kd_losses(self, outputs, teacher, taught=None):
        record["sources"].append(type(self.teacher_source))
        record["in_kd"].append(True)
        try:
            return real_kd_losses(self, outputs, teacher, taught)
        finally:
            record["in_kd"].pop()

    def fp32(fn, *args):
        entry = {
            "kind": "kd" if record["in_kd"] else "sup",
            "inputs": [a.dtype for a in args if a.is_floating_point()],
        }

        def inner(*a):
            entry["autocast_inside"] = torch.is_autocast_enabled("cpu")
            entry["seen"] = [x.dtype for x in a if x.is_floating_point()]
            return fn(*a)

        out = real_fp32(inner, *args)
        entry["out"] = out.dtype
        record["losses"].append(entry)
        return out

    def log(self, name, value, *args, **kwargs):
        if name.startswith("train/") and isinstance(value, torch.Tensor):
            record["logged"].append((name, value.dtype, float(value)))
        return real_log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(common, "fp32", fp32)
    monkeypatch.setattr(student, "fp32", fp32)
    monkeypatch.setattr(student.StudentModule, "kd_losses", kd_losses)
    monkeypatch.setattr(common.MultiTaskModule, "log", log)
    return record


def check_fp32_losses(record: dict, kinds: set[str]) -> None:
    losses = record["losses"]
    assert {e["kind"] for e in losses} == kinds
    # the forward ran under bf16 autocast: network outputs reach the losses as bfloat16 ...
    assert any(torch.bfloat16 in e["inputs"] for e in losses), "forward did not run in bf16"
    for e in losses:
        # ... and every loss runs in float32 with autocast off
        assert e["autocast_inside"] is False, e
        assert all(d == torch.float32 for d in e["seen"]), e
        assert e["out"] == torch.float32, e
    logged = record["logged"]
    assert any(name == "train/loss" for name, _, _ in logged)
    for name, dtype, value in logged:
        assert dtype == torch.float32, (name, dtype)
        assert math.isfinite(value), (name, value)


@pytest.fixture
def bf16_teacher(tiny, spy) -> str:
    ckpt = fit(load_config("teacher", tiny(**BF16)))
    check_fp32_losses(spy, {"sup"})
    spy["losses"].clear()
    spy["logged"].clear()
    return str(ckpt)


def test_bf16_teacher_and_student_losses_are_fp32(tiny, spy, bf16_teacher, tmp_path):
    """Teacher (supervised) then student (online KD from that teacher + supervised), both
    bf16-mixed: the logged losses are finite float32; KD and supervised terms are float32."""
    student = {"kd.teacher": bf16_teacher, "run.dir": tmp_path / "student", **BF16}
    cfg = load_config("distill", tiny(kd="online", **student))
    fit(cfg)
    check_fp32_losses(spy, {"sup", "kd"})
    assert set(spy["sources"]) == {OnlineTeacher}  # the injected source fed every KD term
    kd_logged = [n for n, _, _ in spy["logged"] if n.endswith("/kd")]
    assert kd_logged, "no KD term was logged"


def test_nan_loss_stops_the_run(tiny, monkeypatch):
    """A task loss that turns NaN inside a bf16 fit raises FloatingPointError at the first step,
    naming the task and what to try."""

    def nan_loss(self, pred, target):
        return pred.float().sum(dim=1) * float("nan")

    monkeypatch.setattr(RegressionTask, "loss", nan_loss)
    cfg = load_config("teacher", tiny(**BF16))
    with pytest.raises(FloatingPointError) as info:
        fit(cfg)
    message = str(info.value)
    assert "training loss became nan at step 0" in message
    assert "non-finite terms: ['cdr']" in message
    assert "trainer.precision=bf16-mixed or 32-true" in message
