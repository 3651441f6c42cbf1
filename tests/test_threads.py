"""Intra-op threads per process: cores divided among the node's processes, run.threads wins,
a user's OMP_NUM_THREADS is left alone, and every stage's Trainer applies the choice."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from mtkd import threads
from mtkd.config import ConfigError
from mtkd.run_config import load_config
from mtkd.stages import make_trainer
from mtkd.threads import intra_op_threads, local_processes


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cores", "processes", "env", "override", "expected"),
    [
        (2, 1, {}, None, 2),
        (2, 2, {}, None, 1),  # CPU DDP on 2 cores: one thread per rank, no spin-waiting
        (16, 2, {}, None, 8),
        (16, 3, {}, None, 5),
        (1, 4, {}, None, 1),  # never zero
        (16, 2, {"OMP_NUM_THREADS": "4"}, None, None),  # the user's choice, left to torch
        (16, 2, {"OMP_NUM_THREADS": "4"}, 3, 3),  # run.threads is the run's own choice
        (2, 2, {}, 6, 6),
    ],
)
def test_threads_are_the_cores_shared_by_the_local_processes(
    cores: int, processes: int, env: dict, override: int | None, expected: int | None
) -> None:
    assert intra_op_threads(cores, processes, env, override) == expected


@pytest.mark.unit
def test_zero_threads_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"run.threads=0: give a number of threads >= 1"):
        intra_op_threads(2, 1, {}, 0)


@pytest.mark.unit
def test_local_processes_are_torchruns_local_world_size_else_the_trainers_devices() -> None:
    trainer = SimpleNamespace(num_devices=2)
    assert local_processes(trainer, {}) == 2
    assert local_processes(trainer, {"LOCAL_WORLD_SIZE": "4"}) == 4


class Toy(L.LightningModule):
    """One linear layer that records the intra-op threads its training step runs with."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.seen: list[int] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return self.layer(batch[0]).pow(2).mean()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.utils.data.TensorDataset(torch.randn(4, 2))
        return torch.utils.data.DataLoader(data, batch_size=2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def toy_run(tmp_path: Path, *overrides: str) -> Toy:
    """Two training steps through ``make_trainer``, the Trainer of every stage."""
    cfg = load_config(
        "teacher",
        [
            "logger=none",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_checkpointing=false",
            *overrides,
        ],
    )
    trainer = make_trainer(cfg, tmp_path, [], logger=False)
    toy = Toy()
    trainer.fit(toy)
    return toy


@pytest.mark.integration
@pytest.mark.usefixtures("restore_threads")
def test_a_run_applies_run_threads_and_says_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mtkd")
    torch.set_num_threads(1)
    toy = toy_run(tmp_path, "run.threads=2")
    assert toy.seen == [2, 2]
    said = [m for m in caplog.messages if m.startswith("intra-op threads per process")]
    assert said == ["intra-op threads per process: 2 (run.threads)"]


@pytest.mark.integration
@pytest.mark.usefixtures("restore_threads")
def test_a_run_divides_the_cores_among_the_local_processes_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    torch.set_num_threads(1)
    assert toy_run(tmp_path).seen == [2, 2]


@pytest.mark.integration
@pytest.mark.usefixtures("restore_threads")
def test_a_run_leaves_the_users_omp_num_threads_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    torch.set_num_threads(1)
    assert toy_run(tmp_path).seen == [1, 1]


#: records OMP_WAIT_POLICY at the moment torch is first imported, then loads the CLI and a stage
_WAIT_POLICY_AT_TORCH_IMPORT = """
import builtins, os, sys
seen = []
real_import = builtins.__import__
def spy(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and "torch" not in sys.modules and not seen:
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
import mtkd.cli
import mtkd.stages
print(seen[0] if seen else "torch not loaded")
"""


@pytest.mark.unit
@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_makes_openmp_threads_wait_passively_unless_the_user_chose(
    given: str | None, expected: str
) -> None:
    """Idle OpenMP threads that spin collapse a run sharing its cores with another job; the
    policy only counts if it is in the environment before torch loads its OpenMP runtime."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run(
        [sys.executable, "-c", _WAIT_POLICY_AT_TORCH_IMPORT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[-1] == expected
