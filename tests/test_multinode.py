"""Two nodes, simulated on one CPU machine: torchrun ``--nnodes=2 --nproc-per-node=1`` (two
torchrun processes on localhost, node ranks 0 and 1, gloo) runs ``train-teacher``,
``cache-teacher`` and ``distill`` to the same results as torchrun ``--nnodes=1
--nproc-per-node=2``, and nodes that disagree on the run token fail loudly.

Both layouts are 2 ranks with the same global ranks; what differs is what multi-node changes:
two torchrun agents meeting at a rendezvous, ``LOCAL_RANK`` 0 on both nodes (``GROUP_RANK`` 0
and 1), ``trainer.num_nodes=2 trainer.devices=1``, and the cache's run token, which each node
derives for itself from its own environment (``TORCHELASTIC_RUN_ID`` = ``--rdzv-id``).

Equality is **bitwise** (weights, buffers, cache arrays, metrics): with the same global ranks
each rank sees the same samples in the same order, and the gradient all-reduce of 2 ranks adds
two numbers, which float addition does in either order to the same bits. Augmentation is off
(``data.augment=[]``): albumentations seeds itself from the OS, so with it on even two launches
of the same layout differ (docs/reliability.md, "Limits").

Time on the 2-core development machine: 125 s for the module (108 s for the six launches of
the fixture, 15 s for the token check), hence ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import EXACT, tiny_overrides
from tests.ddp_helpers import odd_split_file, torchrun, torchrun_ok

#: (nnodes, nproc-per-node) of the two launches compared
LAYOUTS = {"one_node": (1, 2), "two_nodes": (2, 1)}

pytestmark = [pytest.mark.ddp, pytest.mark.slow, pytest.mark.integration]


def stage_args(synth_root: Path, work: Path, split_file: Path) -> list[str]:
    """The tiniest run that still exercises every stage under 2 ranks: 64 px, 33 training images
    (odd: the ranks predict 17 and 16 of them), 2 optimiser steps, 4 images per eval batch (several
    cache shards per rank), float32 cache storage."""
    over = tiny_overrides(
        synth_root,
        work,
        **{
            "data.split_file": split_file,
            "data.augment": "[]",
            "data.eval_batch_size": 4,
            "trainer.limit_train_batches": 2,
        },
    )
    return ["trainer=ddp_cpu", *over, *EXACT]


@pytest.fixture(scope="module")
def launches(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each layout's work folder after train-teacher, cache-teacher and distill.

    Both layouts cache the one-node teacher, so their caches must match file for file (the
    fingerprint names the teacher's path); each distills from its own cache."""
    base = tmp_path_factory.mktemp("multinode")
    split_file = odd_split_file(synth_root, base)
    works = {name: base / name for name in LAYOUTS}
    for name, (nnodes, nproc) in LAYOUTS.items():
        work = works[name]
        args = stage_args(synth_root, work, split_file)
        token = f"mtkd-test-{name}-teacher"
        torchrun_ok(
            ["train-teacher", *args, f"run.dir={work / 'teacher'}"],
            nnodes,
            nproc,
            token,
            work / "logs" / "teacher",
        )
    teacher = works["one_node"] / "teacher" / "checkpoints" / "best.ckpt"
    for name, (nnodes, nproc) in LAYOUTS.items():
        work = works[name]
        args = stage_args(synth_root, work, split_file)
        token = f"mtkd-test-{name}-cache"
        torchrun_ok(
            ["cache-teacher", f"teacher={teacher}", *args],
            nnodes,
            nproc,
            token,
            work / "logs" / "cache",
        )
        token = f"mtkd-test-{name}-distill"
        torchrun_ok(
            ["distill", *args, f"run.dir={work / 'student'}"],
            nnodes,
            nproc,
            token,
            work / "logs" / "student",
        )
    return {**works, "split_file": split_file}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(one: Path, two: Path) -> None:
    """Bitwise equal best checkpoints (every parameter and buffer) and validation metrics."""
    want = weights(one / "checkpoints" / "best.ckpt")
    got = weights(two / "checkpoints" / "best.ckpt")
    assert sorted(got) == sorted(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[:5]}"
    metrics = [json.loads((run / "metrics_val.json").read_text())["metrics"] for run in (one, two)]
    assert len(metrics[0]) > 20  # every task's validation metrics and losses
    np.testing.assert_equal(metrics[1], metrics[0])  # NaN (a kappa of one class) equals NaN


def test_two_nodes_form_one_world(launches):
    """The two-node launch is one world of 2 ranks across two torchrun agents (each node holds
    local rank 0), and it trained with trainer.num_nodes=2."""
    logs = launches["two_nodes"] / "logs" / "teacher"
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in (logs / "node0.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (logs / "node1.log").read_text()
    ckpt = launches["two_nodes"] / "teacher" / "checkpoints" / "best.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
    assert (saved["trainer"]["num_nodes"], saved["trainer"]["devices"]) == (2, 1)


def test_two_nodes_train_the_same_teacher(launches):
    assert_same_run(launches["one_node"] / "teacher", launches["two_nodes"] / "teacher")


def test_two_nodes_write_the_same_teacher_cache(launches):
    """Rank 1 (node 1) wrote its shards into the folder rank 0 (node 0) merged, because both
    nodes derived the same run token from ``--rdzv-id``: the merge refuses a cache with a sample
    missing, and here the cache holds all 33 training samples, with rows, fingerprint and
    checksums (so every array) equal to the one-node cache."""
    one, two = (launches[name] / "cache" for name in LAYOUTS)
    split = json.loads(launches["split_file"].read_text())
    train_ids = sorted(k for k, v in split.items() if v == "train")
    assert len(train_ids) == 33
    assert json.loads((two / "index.json").read_text()) == train_ids
    for name in ("index.json", "fingerprint.json", "checksums.json"):
        assert (two / name).read_text() == (one / name).read_text(), name
    arrays = sorted(p.name for p in one.glob("*.npy"))
    assert arrays and sorted(p.name for p in two.glob("*.npy")) == arrays
    for array in arrays:
        np.testing.assert_array_equal(np.load(two / array), np.load(one / array), err_msg=array)
    leftovers = sorted(p.name for p in two.parent.glob(".cache.*"))
    assert not leftovers, f"shard, merge or lock files left behind: {leftovers}"


def test_two_nodes_distill_the_same_student(launches):
    assert_same_run(launches["one_node"] / "student", launches["two_nodes"] / "student")


def test_nodes_with_different_run_tokens_fail_loudly(launches, synth_root, tmp_path):
    """Nodes that derive different run tokens (here different ``MTKD_RUN_TOKEN`` exports; the
    same happens with a launcher that sets none of the token variables, where each node draws
    its own) write their shards into different folders: rank 0 misses rank 1's 16 samples and
    refuses to write the cache instead of writing a partial one."""
    teacher = launches["one_node"] / "teacher" / "checkpoints" / "best.ckpt"
    args = stage_args(synth_root, tmp_path, launches["split_file"])
    results = torchrun(
        ["cache-teacher", f"teacher={teacher}", *args],
        2,
        1,
        "mtkd-test-split-tokens",
        tmp_path / "logs",
        node_env={0: {"MTKD_RUN_TOKEN": "node-a"}, 1: {"MTKD_RUN_TOKEN": "node-b"}},
    )
    assert results[0].returncode != 0
    assert "teacher predictions are missing for 16 samples" in results[0].log
    assert not (tmp_path / "cache" / "fingerprint.json").exists()
    shards = {p.name: len(list(p.glob("*.npz"))) for p in tmp_path.glob(".cache.partial-*")}
    assert shards == {".cache.partial-node-a": 5, ".cache.partial-node-b": 4}  # 17 and 16 at 4
