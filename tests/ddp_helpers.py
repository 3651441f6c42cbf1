"""Launching mtkd in several processes from a test: the CLI as a subprocess (Lightning starts the
other ranks itself), torchrun launches of 1 or more simulated nodes on localhost, and the odd
training split where a padding sampler would repeat a sample. Shared by tests/test_ddp.py and
tests/test_multinode.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mtkd.run_config import load_config
from tests.conftest import REPO, tiny_overrides

#: the console script beside this interpreter (``.venv/bin/mtkd``), else ``python -m mtkd.cli``
_SCRIPT = Path(sys.executable).with_name("mtkd")
MTKD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mtkd.cli"]
#: keeps the subprocess runs single-threaded: 2 ranks on a shared 2-core machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: what an outer launcher (a SLURM job, a torchrun, a shell) may have exported that would decide
#: the ranks or the cache's run token instead of the launch under test
LAUNCHER_KEYS = (
    "MTKD_RUN_TOKEN",
    "TORCHELASTIC_RUN_ID",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def run_cli(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """``mtkd <args>`` in a subprocess from the repository root; fails the test unless rc 0."""
    proc = subprocess.run(
        [*MTKD, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"mtkd {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def odd_split_file(synth_root: Path, work: Path) -> Path:
    """The usual carved splits with one training sample moved to test: 33 train, 8 val and 7 test
    images. With 2 ranks an odd split is where a padding sampler would repeat a sample."""
    from data_modules.datamodule import load_samples

    cfg = load_config("teacher", tiny_overrides(synth_root, work))
    samples = load_samples(cfg.data)
    mapping = {s.sample_id: s.split for s in samples}
    moved = sorted(s.sample_id for s in samples if s.split == "train")[0]
    mapping[moved] = "test"
    path = work / "splits_odd.json"
    path.write_text(json.dumps(mapping, indent=1))
    return path


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for one launch's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env() -> dict[str, str]:
    """ENV without an outer launcher's ranks, SLURM job or run token: what the ranks see then
    comes from the torchrun launch under test only."""
    return {k: v for k, v in ENV.items() if k not in LAUNCHER_KEYS and not k.startswith("SLURM_")}


@dataclass(frozen=True)
class NodeResult:
    node: int
    returncode: int
    log: str


def torchrun(
    args: list[str],
    nnodes: int,
    nproc: int,
    rdzv_id: str,
    log_dir: Path,
    node_env: dict[int, dict[str, str]] | None = None,
    timeout: float = 420,
) -> list[NodeResult]:
    """``mtkd <args>`` on ``nnodes`` simulated nodes x ``nproc`` processes: one torchrun per node
    on localhost (static rendezvous at 127.0.0.1, a free port, the same ``--rdzv-id``), as on a
    cluster where every node runs the same command with its own ``--node-rank``.
    ``trainer.devices`` / ``trainer.num_nodes`` follow the layout. ``node_env``: extra variables
    for one node. Every node's combined output is written to ``log_dir/node<k>.log`` and
    returned; a launch past ``timeout`` seconds is killed whole (each torchrun runs in its own
    process group) and fails the test."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs: list[tuple[int, subprocess.Popen]] = []
    for node in range(nnodes):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--node-rank={node}",
            f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            f"--rdzv-id={rdzv_id}",
            "-m",
            "mtkd.cli",
            *args,
            f"trainer.devices={nproc}",
            f"trainer.num_nodes={nnodes}",
        ]
        env = {**launch_env(), **(node_env or {}).get(node, {})}
        with open(log_dir / f"node{node}.log", "w") as log:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append((node, proc))
    deadline = time.monotonic() + timeout
    try:
        for _, proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        for _, proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        tails = "\n".join((log_dir / f"node{n}.log").read_text()[-3000:] for n, _ in procs)
        raise AssertionError(
            f"mtkd {args[0]} on {nnodes} node(s) ran past {timeout} s:\n{tails}"
        ) from None
    return [
        NodeResult(node, proc.returncode, (log_dir / f"node{node}.log").read_text())
        for node, proc in procs
    ]


def torchrun_ok(args: list[str], nnodes: int, nproc: int, rdzv_id: str, log_dir: Path) -> None:
    """:func:`torchrun`, failing the test unless every node ends with rc 0."""
    for result in torchrun(args, nnodes, nproc, rdzv_id, log_dir):
        assert result.returncode == 0, (
            f"mtkd {args[0]}, node {result.node} of {nnodes}, rc {result.returncode}:\n"
            f"{result.log[-6000:]}"
        )
