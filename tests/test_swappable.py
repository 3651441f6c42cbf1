"""The swappable parts of a training run: teacher source, weighting, optimiser and schedule,
checkpoint monitor direction; each a registry whose unknown names fail listing the valid ones."""

from __future__ import annotations

import math

import pytest
import torch

from data_modules.datamodule import FundusDataModule
from mtkd.config import ConfigError, to_container
from mtkd.kd.teacher_source import (
    CachedTeacher,
    NoTeacher,
    TeacherSource,
    build_teacher_source,
)
from mtkd.modules.optim import build_optimizer, build_schedule
from mtkd.modules.student import StudentModule
from mtkd.modules.teacher import TeacherModule
from mtkd.run_config import load_config
from mtkd.stages import monitor_of
from mtkd.tasks import build_tasks


class ShiftedTeacher(TeacherSource):
    """A teacher that answers the student's own outputs shifted by one: KD terms are > 0."""

    def __init__(self, student: StudentModule) -> None:
        self.student = student

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            raw = self.student(batch["image"])
        return {"cdr": raw["cdr"] + 1.0}


@pytest.fixture
def student_batch(tiny):
    cfg = load_config("distill", tiny(**{"kd.mode": "none", "data.augment": "[]"}))
    torch.manual_seed(0)
    student = StudentModule(to_container(cfg))
    batch = next(iter(FundusDataModule(cfg.data, student.tasks).train_dataloader()))
    return student, batch


@pytest.mark.integration
def test_no_teacher_trains_every_task_on_its_labels_only(student_batch):
    student, batch = student_batch
    assert isinstance(student.teacher_source, NoTeacher)  # kd.mode=none builds it
    total, terms = student.step_losses(batch)
    assert not [k for k in terms if k[1] == "kd"]
    sup = {n: terms[n, "sup"] for n in student.tasks}
    assert total.item() == pytest.approx(student.weighting(sup).item())


@pytest.mark.integration
def test_an_injected_teacher_source_feeds_the_kd_terms(student_batch):
    student, batch = student_batch
    student.teacher_source = ShiftedTeacher(student)
    total, terms = student.step_losses(batch)
    assert [k for k in terms if k[1] == "kd"] == [("cdr", "kd")]  # only the task it covers
    a = student.alpha["cdr"]
    assert terms["cdr", "loss"].item() == pytest.approx(
        ((1 - a) * terms["cdr", "sup"] + a * terms["cdr", "kd"]).item()
    )
    assert terms["cdr", "kd"].item() > 0


@pytest.mark.unit
def test_teacher_sources_by_name():
    assert isinstance(build_teacher_source("cached"), CachedTeacher)
    with pytest.raises(ValueError, match="no teacher outputs; set kd.cache_dir"):
        CachedTeacher().outputs({"image": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"kd.mode='x' is unknown; choose one of: cached, none"):
        build_teacher_source("x")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("monitor", "mode"),
    [
        (None, "max"),
        ("val/loss", "min"),
        ("val/dr_grade/kappa", "max"),
        ("val/cdr/mae", "min"),
        ("val/cdr/r2", "max"),
        ("val/cdr/loss", "min"),
        ("val/landmarks/dist_px_fovea", "min"),  # a name list guessed "max" here
    ],
)
def test_monitor_direction_comes_from_the_metric(monitor, mode):
    cfg = load_config("teacher", [f"run.monitor={monitor}"] if monitor else [])
    tasks = build_tasks(to_container(cfg.tasks))
    assert monitor_of(cfg, tasks) == (monitor or "val/score", mode)


@pytest.mark.unit
def test_an_unknown_monitor_lists_the_metrics():
    cfg = load_config("teacher", ["run.monitor=val/cdr/accuracy"])
    with pytest.raises(ConfigError, match="val/cdr/mae"):
        monitor_of(cfg, build_tasks(to_container(cfg.tasks)))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "cls", "extra"),
    [
        ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
        ("adam", torch.optim.Adam, {}),
        ("adamw", torch.optim.AdamW, {}),
    ],
)
def test_optimisers_keep_their_settings(name, cls, extra):
    cfg = load_config("teacher", [f"optim.name={name}", "optim.weight_decay=0.01"])
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1},
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0},
    ]
    opt = build_optimizer(groups, cfg.optim)
    assert type(opt) is cls
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.0]  # each group keeps its own rate
    for key, value in {"weight_decay": 0.01, **extra}.items():
        assert opt.param_groups[0][key] == value, key


@pytest.mark.unit
def test_cosine_schedule_warms_up_then_decays_each_group_to_zero():
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
    ]
    opt = torch.optim.SGD(groups, lr=1.0)
    sched = build_schedule("cosine", opt, total=10, warmup=2)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expected = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert [lr for _, lr in seen] == pytest.approx(expected)
    assert [lr for lr, _ in seen] == pytest.approx([0.1 * m for m in expected])
    assert build_schedule("none", opt, 10, 2) is None
    with pytest.raises(ValueError, match=r"optim.scheduler='nope' is unknown; choose one of: "):
        build_schedule("nope", opt, 10, 2)


@pytest.mark.unit
def test_checkpoints_with_every_strategys_weighting_state_still_load():
    """Before the registry every checkpoint held ``weighting.dwa_weights``, whatever the mode."""
    module = TeacherModule(to_container(load_config("teacher", ["model=student"])))
    state = {**module.state_dict(), "weighting.dwa_weights": torch.ones(len(module.tasks))}
    checkpoint = {"state_dict": state}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict
    assert "weighting.dwa_weights" not in checkpoint["state_dict"]


@pytest.mark.unit
def test_a_tasks_kd_entry_sets_its_alpha_and_temperature_and_null_takes_the_runs(tiny):
    cfg = load_config(
        "distill",
        tiny(
            **{
                "kd.alpha": 0.5,
                "kd.tasks.dr_grade": "{alpha: 0.2, temperature: 2.0}",
                "kd.tasks.cdr": "{alpha: null, loss: l1}",
            }
        ),
    )
    student = StudentModule(to_container(cfg))
    assert student.alpha == {n: 0.2 if n == "dr_grade" else 0.5 for n in student.tasks}
    assert student.temperature["dr_grade"] == 2.0
    assert student.temperature["dme_risk"] == student.tasks["dme_risk"].default_temperature
    assert student.tasks["cdr"].kd_loss_name == "l1"
    assert student.tasks["lesions"].kd_loss_name == "kl_dice"  # the kind's default
