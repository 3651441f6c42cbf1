"""Fault injection (``faults``): train-teacher, distill and cache-teacher killed with SIGKILL (no
cleanup, no exception handler) at a random but seeded point, then resumed or rerun. Nothing that
finished is lost, the result equals an uninterrupted run's (bitwise, on CPU), and no partial file
is ever read as complete."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mtkd.kd.cache import TeacherCache
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, fit
from mtkd.tasks import build_tasks
from tests.conftest import REPO, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: ``fit`` of stage argv[1], killed at batch argv[2] (modulo the epoch's batches) of epoch 2 of 4
KILLED_FIT = textwrap.dedent(
    """
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    import mtkd.stages as stages
    from mtkd.run_config import load_config

    stage, at = sys.argv[1], int(sys.argv[2])

    class Kill(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == at % trainer.num_training_batches:
                os.kill(os.getpid(), signal.SIGKILL)

    make = stages.make_trainer
    stages.make_trainer = lambda cfg, d, cbs, log: make(cfg, d, [*cbs, Kill()], log)
    stages.fit(load_config(stage, sys.argv[3:]))
    """
)

#: ``cache_teacher``, killed just before its argv[1]-th rename of a file or folder of the cache
#: (0-based): a shard, index.json, checksums.json, fingerprint.json or the finished folder
KILLED_CACHE = textwrap.dedent(
    """
    import os, signal, sys
    import mtkd.stages as stages
    from mtkd.run_config import load_config
    from tests.test_reliability_resume import in_cache

    at, done, replace = int(sys.argv[1]), [], os.replace

    def killing_replace(src, dst):
        if in_cache(dst):
            if len(done) == at:
                os.kill(os.getpid(), signal.SIGKILL)
            done.append(dst)
        replace(src, dst)

    os.replace = killing_replace
    stages.cache_teacher(load_config("distill", sys.argv[2:]))
    """
)

#: the teacher cache's folder name in these tests
CACHE = "tcache"
#: 4 epochs without augmentation (with persistent workers a resumed run's augmentation would
#: start from new worker seeds; shuffling, dropout and the optimizer are restored). The monitored kappa stays at 0 after epoch 0, so best.ckpt stops moving: the case
#: where last.ckpt used to stay at epoch 0 too.
RESUMABLE = {"trainer.max_epochs": 4, "data.augment": "[]", "run.monitor": "val/dr_grade/kappa"}


def in_cache(path: str | Path) -> bool:
    """True for the cache folder, anything inside it and its ``.tcache.*`` siblings."""
    return any(part == CACHE or part.startswith(f".{CACHE}.") for part in Path(path).parts)


def _run(script: str, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", script, *map(str, args)]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True)


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _kill_resume_and_compare(stage: str, over: list[str], run_dir: Path, reference: Path) -> None:
    """Kill ``fit`` during epoch 2 at a seeded batch, resume from last.ckpt and compare the final
    weights with the uninterrupted run's ``reference`` last.ckpt."""
    at = random.Random(stage).randrange(1000)
    proc = _run(KILLED_FIT, stage, at, *over)
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1  # epochs 0, 1 kept

    fit(load_config(stage, [*over, f"run.resume={last}"]))
    resumed, expected = _weights(last), _weights(reference)
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3
    assert resumed.keys() == expected.keys()
    differing = [k for k in expected if not torch.equal(resumed[k], expected[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_killed_run_resumes_at_the_next_epoch_and_matches_an_uninterrupted_run(
    synth_root, tmp_path
):
    ref = fit(load_config("teacher", tiny_overrides(synth_root, tmp_path / "ref", **RESUMABLE)))
    over = tiny_overrides(synth_root, tmp_path / "killed", **RESUMABLE)
    _kill_resume_and_compare("teacher", over, tmp_path / "killed", ref.parent / "last.ckpt")


@pytest.fixture(scope="module")
def taught(synth_root, tmp_path_factory):
    """A tiny teacher, its cache written uninterrupted, and every rename that writing made in
    the cache (the points a kill can fall between)."""
    root = tmp_path_factory.mktemp("faults")
    teacher = fit(load_config("teacher", tiny_overrides(synth_root, root / "teacher")))
    renamed: list[str] = []
    replace = os.replace

    def recording(src, dst):
        if in_cache(dst):
            renamed.append(str(dst))
        replace(src, dst)

    over = _cache_overrides(synth_root, root / "ref", teacher)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", recording)
        cache_teacher(load_config("distill", over))
    return teacher, root / "ref" / CACHE, renamed


def _cache_overrides(synth_root: Path, run_dir: Path, teacher: Path, **extra) -> list[str]:
    values = {"kd.cache_dir": run_dir / CACHE, "cache.teacher": f"[{teacher}]", **extra}
    return tiny_overrides(synth_root, run_dir, **values)


@pytest.mark.parametrize("phase", ["shards", "merge"])
def test_killed_cache_teacher_leaves_no_cache_that_reads_as_complete_and_reruns_to_the_same(
    synth_root, tmp_path, taught, phase
):
    teacher, reference, renamed = taught
    shards = [i for i, dst in enumerate(renamed) if ".partial-" in dst]
    points = shards if phase == "shards" else sorted(set(range(len(renamed))) - set(shards))
    at = random.Random(phase).choice(points)
    over = _cache_overrides(synth_root, tmp_path, teacher)
    proc = _run(KILLED_CACHE, at, *over)
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    cache_dir = tmp_path / CACHE
    tasks = build_tasks(dict(load_config("distill", over).tasks))
    with pytest.raises(FileNotFoundError, match="incomplete|does not exist"):
        TeacherCache(cache_dir, tasks)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f".{CACHE}.")]  # the leftovers

    cache_teacher(load_config("distill", over))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{CACHE}.")]
    TeacherCache(cache_dir, tasks, full=True)  # verifies every checksum
    for name in ("checksums.json", "fingerprint.json"):  # checksums: every array, bitwise
        assert json.loads((cache_dir / name).read_text()) == json.loads(
            (reference / name).read_text()
        )


def test_killed_distill_resumes_and_matches_an_uninterrupted_run(synth_root, tmp_path, taught):
    teacher, reference, _ = taught
    cache = {"kd.cache_dir": reference, "cache.teacher": f"[{teacher}]", **RESUMABLE}
    ref = fit(load_config("distill", tiny_overrides(synth_root, tmp_path / "ref", **cache)))
    over = tiny_overrides(synth_root, tmp_path / "killed", **cache)
    _kill_resume_and_compare("distill", over, tmp_path / "killed", ref.parent / "last.ckpt")
