"""Intra-op threads per process: the cores this process may use, shared by the local processes.

torch starts one OpenMP thread per core in every process; two processes (DDP ranks, or another
job) on the same cores then spin-wait on each other and a forward pass gets 10-90x slower.
``run.threads`` sets the number; null divides the cores among the node's processes, and an
``OMP_NUM_THREADS`` set by the user is left alone. DataLoader workers already use one thread
each (torch sets it in every worker).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from mtkd.config import ConfigError
from mtkd.status import status_logger

log = status_logger(__name__)


def intra_op_threads(
    cores: int, processes: int, env: Mapping[str, str], override: int | None
) -> int | None:
    """Threads for one process: ``override`` (run.threads) when given, None (leave torch as it
    is) when ``env`` sets OMP_NUM_THREADS, else ``cores // processes`` and at least one."""
    if override is not None:
        if override < 1:
            raise ConfigError(
                f"run.threads={override}: give a number of threads >= 1, or null for "
                "cores / local processes"
            )
        return override
    if env.get("OMP_NUM_THREADS"):
        return None
    return max(1, cores // max(1, processes))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes(trainer: Trainer, env: Mapping[str, str]) -> int:
    """The training processes on this node: torchrun's LOCAL_WORLD_SIZE, else the Trainer's
    devices per node (the ranks Lightning launches here)."""
    return int(env.get("LOCAL_WORLD_SIZE") or trainer.num_devices)


class ThreadBudget(Callback):
    """Sets this process's intra-op threads when its Trainer sets up, in every DDP rank."""

    def __init__(self, override: int | None) -> None:
        self.override = override
        #: the number set, so fit's and validate's setup say it once
        self.applied: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        processes = local_processes(trainer, os.environ)
        cores = available_cores()
        threads = intra_op_threads(cores, processes, os.environ, self.override)
        if threads is None or threads == self.applied:
            return
        torch.set_num_threads(threads)
        self.applied = threads
        how = (
            "run.threads"
            if self.override is not None
            else f"{cores} cores / {processes} process(es)"
        )
        log.info(f"intra-op threads per process: {threads} ({how})")
