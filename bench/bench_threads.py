"""Threads under contention: intra-op threads per CPU DDP rank, and OpenMP's wait policy.

Why: torch starts one OpenMP thread per core in every process, so two DDP ranks on 2 cores run
4 spinning threads and each waits on the other's; mtkd's default (``run.threads=null``) gives
each rank cores / local ranks (``mtkd.threads``). And with libgomp's default wait policy idle
threads spin, so any other job on the cores (a second run, a compile) makes a forward pass
5-10x slower; the CLI sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (``mtkd.cli``).

Default: the same tiny 2-rank CPU DDP ``train-teacher`` with torch's threads and mtkd's, the
arms alternated. ``--wait-policy``: a one-process ``train-teacher`` (all cores' threads) with
libgomp's default policy (torch loaded before the CLI runs, so the CLI's choice comes too late,
as before it existed) and with the CLI's PASSIVE, quiet and beside ``--burners`` CPU-bound
processes the benchmark starts; loaded times are compared with the fair-share time, the quiet
time x (threads + burners) / cores. Subprocesses inherit no OMP_NUM_THREADS or OMP_WAIT_POLICY.

    .venv/bin/python bench/bench_threads.py [--repeats 2] [--epochs 2]
    .venv/bin/python bench/bench_threads.py --wait-policy [--burners 2] [--repeats 2]
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

from mtkd.markdown import markdown_table

REPO = Path(__file__).resolve().parent.parent
MTKD = str(Path(sys.executable).with_name("mtkd"))
CORES = len(os.sched_getaffinity(0))

#: arm -> run.threads (null: mtkd's default, cores / local processes)
ARMS = {f"torch default ({CORES} threads per rank)": str(CORES), "mtkd default": "null"}


#: the environment the arms choose themselves
CHOSEN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
#: runs the CLI after torch has loaded, so OpenMP keeps its default wait policy (the "before")
CLI_AFTER_TORCH = [
    sys.executable,
    "-c",
    "import sys, torch; from mtkd.cli import main; sys.exit(main(sys.argv[1:]))",
]
#: wait-policy arm -> how train-teacher is started, and the environment it adds
POLICIES = {
    "libgomp default (spin 300k)": (CLI_AFTER_TORCH, {}),
    "PASSIVE": (CLI_AFTER_TORCH, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "spin 10k (GOMP_SPINCOUNT)": (CLI_AFTER_TORCH, {"GOMP_SPINCOUNT": "10000"}),
    "mtkd CLI": ([MTKD], {}),
}
BURN = "while True: pass"


def timed_run(
    work: Path,
    threads: str,
    epochs: int,
    name: str,
    launcher: list[str],
    *extra: str,
    env_extra: dict[str, str] | None = None,
) -> float:
    env = {k: v for k, v in os.environ.items() if k not in CHOSEN} | (env_extra or {})
    args = [
        *launcher,
        "train-teacher",
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
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"train-teacher failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def ddp_threads(args: argparse.Namespace, work: Path) -> None:
    timed_run(work, "null", 1, "warmup", [MTKD], "trainer=ddp_cpu")  # data + preprocessing cache
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(args.repeats):
        for i, (arm, threads) in enumerate(ARMS.items()):
            times[arm].append(
                timed_run(work, threads, args.epochs, f"r{r}a{i}", [MTKD], "trainer=ddp_cpu")
            )
    print(
        f"\n## CPU DDP, 2 ranks on {CORES} cores: tiny train-teacher ({args.epochs} epochs, "
        f"64 px, 64 synthetic images), wall time per run incl. start-up, {args.repeats} runs "
        "per arm alternated\n"
    )
    rows = [
        [arm, f"{statistics.median(values):.1f}", ", ".join(f"{v:.1f}" for v in values)]
        for arm, values in times.items()
    ]
    print(markdown_table(["arm", "median s", "runs s"], rows))
    before, after = (statistics.median(v) for v in times.values())
    print(f"\ntorch default / mtkd default = {before / after:.2f}x")


def wait_policy(args: argparse.Namespace, work: Path) -> None:
    size = [f"data.image_size={args.size}", "data.batch_size=16"]
    timed_run(work, "null", 1, "warmup", [MTKD], *size)  # data + preprocessing cache
    times = {(arm, load): [] for arm in POLICIES for load in ("quiet", "loaded")}
    for r in range(args.repeats):
        for load in ("quiet", "loaded"):
            burners = [
                subprocess.Popen([sys.executable, "-c", BURN])
                for _ in range(args.burners if load == "loaded" else 0)
            ]
            try:
                for i, (arm, (launcher, env)) in enumerate(POLICIES.items()):
                    name = f"r{r}{load}{i}"
                    times[arm, load].append(
                        timed_run(work, "null", args.epochs, name, launcher, *size, env_extra=env)
                    )
            finally:
                for proc in burners:
                    proc.kill()
                    proc.wait()
    share = max(1.0, (CORES + args.burners) / CORES)
    print(
        f"\n## OpenMP wait policy: tiny train-teacher, one process, {CORES} threads on {CORES} "
        f"cores ({args.epochs} epochs, {args.size} px, batch 16, 64 synthetic images), quiet and beside "
        f"{args.burners} CPU-bound processes; wall time per run incl. start-up, {args.repeats} "
        f"runs per cell alternated; fair share = quiet x {share:.1f}\n"
    )
    rows = []
    for arm in POLICIES:
        quiet, loaded = (statistics.median(times[arm, x]) for x in ("quiet", "loaded"))
        runs = "; ".join(", ".join(f"{v:.1f}" for v in times[arm, x]) for x in ("quiet", "loaded"))
        rows.append([arm, f"{quiet:.1f}", f"{loaded:.1f}", f"{loaded / (quiet * share):.2f}", runs])
    header = ["wait policy", "quiet s", "loaded s", "loaded / fair share", "runs (quiet; loaded)"]
    print(markdown_table(header, rows))
    before = [statistics.median(times[next(iter(POLICIES)), x]) for x in ("quiet", "loaded")]
    for arm in list(POLICIES)[1:]:
        quiet, loaded = (statistics.median(times[arm, x]) for x in ("quiet", "loaded"))
        print(
            f"\n{arm} / default: quiet {quiet / before[0]:.3f}x (target <= 1.03), loaded "
            f"{loaded / before[1]:.3f}x; loaded / fair share {loaded / (quiet * share):.2f} "
            "(target <= 1.5)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--wait-policy", action="store_true", help="time OMP_WAIT_POLICY instead")
    parser.add_argument("--burners", type=int, default=2, help="CPU-bound processes (loaded)")
    parser.add_argument("--size", type=int, default=96, help="--wait-policy: working size (px)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mtkd-bench-") as tmp:
        (wait_policy if args.wait_policy else ddp_threads)(args, Path(tmp))


if __name__ == "__main__":
    main()
