"""Intra-op threads per process under CPU DDP: torch's default vs mtkd's default.

Why: torch starts one OpenMP thread per core in every process, so two DDP ranks on 2 cores run
4 spinning threads and each waits on the other's; mtkd's default (``run.threads=null``) gives
each rank cores / local ranks (``mtkd.threads``). This times the same tiny 2-rank CPU DDP
``train-teacher`` with each setting, the arms alternated, in subprocesses that do not inherit
an OMP_NUM_THREADS (which mtkd would respect).

    .venv/bin/python bench/bench_threads.py [--repeats 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MTKD = str(Path(sys.executable).with_name("mtkd"))
CORES = len(os.sched_getaffinity(0))

#: arm -> run.threads (null: mtkd's default, cores / local processes)
ARMS = {f"torch default ({CORES} threads per rank)": str(CORES), "mtkd default": "null"}


def timed_run(work: Path, threads: str, epochs: int, name: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    args = [
        MTKD,
        "train-teacher",
        "trainer=ddp_cpu",
        "model=student",
        f"run.threads={threads}",
        f"run.dir={work / name}",
        f"data.sources.synthetic.root={work / 'synth'}",
        "data.sources.synthetic.options={n: 64, image_size: 128, seed: 0}",
        "data.image_size=64",
        "data.batch_size=8",
        f"data.preprocess.cache_dir={work / 'pre'}",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "logger=none",
    ]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"train-teacher failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternated")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mtkd-bench-") as tmp:
        work = Path(tmp)
        timed_run(work, "null", 1, "warmup")  # generates the data and the preprocessing cache
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for r in range(args.repeats):
            for i, (arm, threads) in enumerate(ARMS.items()):
                times[arm].append(timed_run(work, threads, args.epochs, f"r{r}a{i}"))
    print(
        f"\n## CPU DDP, 2 ranks on {CORES} cores: tiny train-teacher ({args.epochs} epochs, "
        f"64 px, 64 synthetic images), wall time per run incl. start-up, {args.repeats} runs "
        "per arm alternated\n"
    )
    print("| arm | median s | runs s |\n|---|---|---|")
    for arm, values in times.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {arm} | {statistics.median(values):.1f} | {runs} |")
    before, after = (statistics.median(v) for v in times.values())
    print(f"\ntorch default / mtkd default = {before / after:.2f}x")


if __name__ == "__main__":
    main()
