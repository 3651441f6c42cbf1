"""Fault injection: a training run killed with SIGKILL mid-epoch, resumed from ``last.ckpt``,
ends with exactly the weights of an uninterrupted run of the same seed (bitwise, on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mtkd.config import load_config
from mtkd.stages import fit
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.integration

#: kills its own process (SIGKILL: no cleanup, no exception handler) at batch 2 of epoch 2 of 3
KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    import mtkd.stages as stages
    from mtkd.config import load_config

    class Kill(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    make = stages.make_trainer
    stages.make_trainer = lambda cfg, d, cbs, log: make(cfg, d, [*cbs, Kill()], log)
    stages.fit(load_config("teacher", sys.argv[1:]))
    """
)


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_run_resumes_at_the_next_epoch_and_matches_an_uninterrupted_run(
    synth_root, tmp_path
):
    # No augmentation: albumentations draws from its own generator, seeded from the OS, so even
    # two uninterrupted runs differ with it. Shuffling, dropout and the optimizer are restored.
    # The monitored val/dr_grade/kappa stays at 0 here after epoch 0, so best.ckpt stops moving:
    # the case where last.ckpt used to stay at epoch 0 too.
    extra = {"trainer.max_epochs": 4, "data.augment": "[]", "run.monitor": "val/dr_grade/kappa"}
    reference = fit(load_config("teacher", tiny_overrides(synth_root, tmp_path / "ref", **extra)))

    over = tiny_overrides(synth_root, tmp_path / "killed", **extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *over], cwd=REPO, env=env, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1  # epochs 0, 1 kept

    fit(load_config("teacher", [*over, f"run.resume={last}"]))
    resumed = _weights(last)
    expected = _weights(reference.parent / "last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3
    assert resumed.keys() == expected.keys()
    differing = [k for k in expected if not torch.equal(resumed[k], expected[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
