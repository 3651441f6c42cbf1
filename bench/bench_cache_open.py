"""Opening a teacher cache: the quick check (sizes and .npy headers) vs the full one (every byte
hashed), by cache size.

Why: ``distill`` opens the cache on every rank at each start. A 512 px cache holds about 1.5 GiB
per 1,000 images, so hashing it at each open (what every open did before ``cache.verify``) grows
with the cache: ~50 GiB per rank for a 35k-image unlabeled pool. The quick check must stay at
milliseconds whatever the size; ``cache.verify=full`` and ``mtkd cache-check`` pay the hashing.

Each cache is written with the cache module's own sealing code (``seal``: index, checksums,
fingerprint) over memory-mapped arrays of random bytes shaped as ``cache-teacher`` shapes the
synthetic task set (two 3-channel dense maps at ``--size`` px, uint8, plus the logits, values and
points). Per size: the median of ``--repeats`` opens of each kind, the full one with the files in
the page cache (warm: what hashing itself costs) and with their pages dropped first
(``posix_fadvise``, cold: read from disk too). The folder is a ``tempfile.mkdtemp`` folder,
deleted at the end.

    .venv/bin/python bench/bench_cache_open.py [--samples 1000 4000 16000] [--size 96]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mtkd.config import to_container  # noqa: E402
from mtkd.kd.cache import TeacherCache, fingerprint, seal  # noqa: E402
from mtkd.kd.storage import cache_storage  # noqa: E402
from mtkd.markdown import markdown_table  # noqa: E402
from mtkd.run_config import load_config  # noqa: E402
from mtkd.tasks import Task, build_tasks  # noqa: E402

#: rows written per chunk of random bytes (memory stays flat whatever the cache size)
CHUNK = 1000


def write_cache(folder: Path, samples: int, size: int) -> dict[str, Task]:
    """A complete cache of ``samples`` rows at ``size`` px in ``folder``; returns its tasks."""
    cfg = load_config("distill", [f"data.image_size={size}", "logger=none"])
    tasks = build_tasks(to_container(cfg)["tasks"])
    storage = cache_storage(cfg)
    ids = [f"s{i:06d}" for i in range(samples)]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name, task in tasks.items():
        shape = (samples, *task.cache_shape(storage.for_task(name)))
        dtype = task.cache_dtype(storage.for_task(name))
        array = np.lib.format.open_memmap(folder / f"{name}.npy", "w+", dtype, shape)
        for start in range(0, samples, CHUNK):
            raw = array[start : start + CHUNK].view(np.uint8)
            raw[...] = rng.integers(0, 256, raw.shape, np.uint8)
        array.flush()
        del array
    teacher = {"path": "bench-teacher.ckpt", "sha256": "0" * 64}
    taught = {name: [{**teacher, "task": name}] for name in tasks}
    digests = {sid: f"{i:032x}" for i, sid in enumerate(ids)}
    seal(folder, ids, fingerprint(taught, tasks, cfg.data, digests, storage, 0))
    return tasks


def evict(folder: Path) -> None:
    """Drop the page-cache pages of the cache's files (written back first), so the next read
    comes from disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def median_seconds(
    run: Callable[[], object], repeats: int, before: Callable[[], None] | None = None
) -> float:
    """The median wall time of ``repeats`` calls of ``run``, each after ``before`` (untimed)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--size", type=int, default=96, help="side of the dense maps in px")
    parser.add_argument("--repeats", type=int, default=3, help="opens of each kind per size")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mtkd-bench-cache-open-"))
    rows = []
    try:
        for samples in args.samples:
            folder = work / f"cache_{samples}"
            tasks = write_cache(folder, samples, args.size)
            mib = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            quick = partial(TeacherCache, folder, tasks)
            full = partial(TeacherCache, folder, tasks, full=True)
            cold = partial(evict, folder)
            rows.append(
                (
                    samples,
                    mib,
                    median_seconds(quick, args.repeats),
                    median_seconds(quick, args.repeats, cold),
                    median_seconds(full, args.repeats),
                    median_seconds(full, args.repeats, cold),
                )
            )
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n## Opening a teacher cache: quick vs full check ({args.size} px dense maps, uint8; "
        f"median of {args.repeats} opens)\n"
    )
    header = [
        "samples",
        "cache MiB",
        "quick, warm (ms)",
        "quick, cold (ms)",
        "full, warm (s)",
        "full, cold (s)",
        "full / quick (cold)",
    ]
    cells = [
        [
            f"{samples:,}",
            f"{mib:,.0f}",
            f"{quick_warm * 1e3:.1f}",
            f"{quick_cold * 1e3:.1f}",
            f"{full_warm:.2f}",
            f"{full_cold:.2f}",
            f"{full_cold / quick_cold:,.0f}x",
        ]
        for samples, mib, quick_warm, quick_cold, full_warm, full_cold in rows
    ]
    print(markdown_table(header, cells, right=range(len(header))))


if __name__ == "__main__":
    main()
