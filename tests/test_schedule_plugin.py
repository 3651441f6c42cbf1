"""The schedule example of docs/extending.md, a file outside the library
(``examples/extending/schedule.py``): picked with its options through the config alone, its
options checked before any work."""

from __future__ import annotations

import pytest
import torch

from mtkd.config import ConfigError
from mtkd.modules.optim import build_schedule
from mtkd.run_config import load_config
from tests.conftest import REPO

pytestmark = pytest.mark.unit

EXAMPLES = REPO / "examples" / "extending"


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


def rates(choice, total: int, warmup: int) -> list[list[float]]:
    """Each parameter group's rate at every step of a run under ``choice``."""
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
    ]
    opt = torch.optim.SGD(groups, lr=1.0)
    sched = build_schedule(choice, opt, total, warmup)
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


def test_step_schedule_takes_its_options_from_the_config(examples) -> None:
    over = ["plugins=[schedule]", "optim.scheduler={name: step, milestones: [0.5, 0.8]}"]
    choice = load_config("teacher", over).optim.scheduler
    seen = rates(choice, total=10, warmup=2)
    expected = [1 / 3, 2 / 3, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01]  # gamma 0.1 by default
    assert [lr for _, lr in seen] == pytest.approx(expected)
    assert [lr for lr, _ in seen] == pytest.approx([0.1 * m for m in expected])
    halved = rates({"name": "step", "milestones": [0.5], "gamma": 0.5}, total=4, warmup=0)
    assert [lr for _, lr in halved] == pytest.approx([1, 1, 0.5, 0.5])


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ("step", r"optim.scheduler='step': missing options \['milestones'\]"),
        (
            "{name: step, milestones: [0.5], gama: 0.5}",
            r"unknown options \['gama'\]; valid options: milestones, gamma$",
        ),
    ],
)
def test_step_schedule_options_are_checked_before_any_work(examples, scheduler, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("teacher", ["plugins=[schedule]", f"optim.scheduler={scheduler}"])
