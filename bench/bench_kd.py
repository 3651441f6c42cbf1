"""Distillation benchmarks, measured side by side in one process on this machine.

1. Student training-step time: no KD, cached KD, online KD (same batches, same student).
2. Cache write throughput (cache-teacher) and read throughput with the join + augmentation,
   next to the student's consumption rate; bytes per sample.
3. Memory: anonymous (heap) memory of reading a cache does not grow with the cache size:
   the same reads against a cache 10x larger.

    .venv/bin/python bench/bench_kd.py [--size 96] [--steps 6] [--rounds 9]

The step-time ratios are taken within each round (the modes interleaved, same batches), so the
median ratio resolves a 2 % difference where one pass per mode did not (1.18 / 0.95 / 1.06 for
three runs of the same code).

Prints Markdown tables (copied into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_modules.datamodule import FundusDataModule  # noqa: E402
from mtkd.config import load_config, to_container  # noqa: E402
from mtkd.kd.cache import TeacherCache  # noqa: E402
from mtkd.models.multitask import count_parameters  # noqa: E402
from mtkd.modules.student import StudentModule  # noqa: E402
from mtkd.modules.teacher_source import build_teacher_source  # noqa: E402
from mtkd.stages import cache_teacher, fit, open_checked_cache  # noqa: E402


def overrides(work: Path, size: int) -> list[str]:
    return [
        f"data.sources.synthetic.root={work / 'synth'}",
        "data.sources.synthetic.options={n: 200, image_size: 256, seed: 0}",
        f"data.image_size={size}",
        f"data.preprocess.cache_dir={work / 'pre'}",
        f"kd.cache_dir={work / 'cache'}",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]


MODES = ("none", "cached", "online")


def one_step(student: StudentModule, batch: dict, opt) -> float:
    """Seconds of one forward + backward + optimizer step."""
    start = time.perf_counter()
    opt.zero_grad()
    loss, _ = student.step_losses(batch)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def interleaved_rounds(
    student: StudentModule, sources: dict, batches: list[dict], opt, rounds: int
) -> dict[str, list[float]]:
    """Per mode, the median step time of each round. Every round times each mode on the same
    batches, in an order rotated each round, so drift in the machine's speed (another job, CPU
    frequency) lands on all modes alike; one warm-up pass per mode comes first."""
    for mode in MODES:
        student.teacher_source = sources[mode]
        for batch in batches[:2]:
            one_step(student, batch, opt)
    medians: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
            student.teacher_source = sources[mode]
            medians[mode].append(statistics.median(one_step(student, b, opt) for b in batches))
    return medians


def step_benchmark(work: Path, size: int, steps: int, rounds: int, teacher_ckpt: str) -> dict:
    cfg = load_config("distill", [*overrides(work, size), f"kd.teacher={teacher_ckpt}"])
    cache = open_checked_cache(cfg, StudentModule(to_container(cfg)).tasks)
    student = StudentModule(to_container(cfg))
    dm = FundusDataModule(cfg.data, student.tasks, teacher=cache)
    loader = dm.train_dataloader()
    batches = [b for _, b in zip(range(steps), loader)]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    sources = {mode: build_teacher_source(mode) for mode in MODES}
    for source in sources.values():
        source.setup(cfg)
    medians = interleaved_rounds(student, sources, batches, opt, rounds)
    results: dict = {mode: statistics.median(medians[mode]) for mode in MODES}
    results["ratios"] = {
        mode: [m / n for m, n in zip(medians[mode], medians["none"])] for mode in MODES
    }
    teacher = sources["online"].ensemble
    x = batches[0]["image"]
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(3):
            teacher(x)
        results["teacher_forward"] = (time.perf_counter() - t0) / 3
    results["student_params"] = count_parameters(student.net)
    results["teacher_params"] = count_parameters(teacher.nets)
    results["batch_size"] = int(x.shape[0])
    return results


def io_benchmark(work: Path, size: int, teacher_ckpt: str) -> dict:
    cfg = load_config("distill", [*overrides(work, size), f"cache.teacher=[{teacher_ckpt}]"])
    start = time.perf_counter()
    cache_teacher(cfg)
    write_seconds = time.perf_counter() - start
    student = StudentModule(to_container(cfg))
    cache = TeacherCache(cfg.kd.cache_dir, student.tasks)
    n = len(cache.rows)
    dm = FundusDataModule(cfg.data, student.tasks, teacher=cache)
    with_cache = dm.dataset("train", train=True)
    plain = FundusDataModule(cfg.data, student.tasks).dataset("train", train=True)
    for ds in (with_cache, plain):  # warm the preprocessing cache
        ds[0]
    timings = {}
    for name, ds in (("read_join_augment", with_cache), ("no_teacher_augment", plain)):
        start = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        timings[name] = len(ds) / (time.perf_counter() - start)
    return {
        "samples": n,
        "write_samples_per_s": n / write_seconds,
        "bytes_per_sample": cache.nbytes_per_sample(),
        **{f"{k}_samples_per_s": v for k, v in timings.items()},
    }


MEMORY_PROBE = r"""
import json, re, sys
import numpy as np
from pathlib import Path
root, rows, reads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
maps = np.load(root / "maps.npy", mmap_mode="r")
logits = np.load(root / "logits.npy", mmap_mode="r")
rng = np.random.default_rng(0)
total = 0.0
for i in rng.integers(0, rows, reads):
    total += float(maps[i].astype(np.float32).mean()) + float(logits[i].astype(np.float32).sum())
status = Path("/proc/self/status").read_text()
kb = lambda key: int(re.search(key + r":\s+(\d+)", status).group(1))
print(json.dumps({"rss_anon_mb": kb("RssAnon") / 1024, "rss_file_mb": kb("RssFile") / 1024,
                  "peak_rss_mb": kb("VmHWM") / 1024}))
"""


def memory_benchmark(work: Path, rows: int, reads: int) -> dict:
    """Read ``reads`` random rows of a cache with ``rows`` and 10x ``rows`` samples (same
    per-sample layout as the default: 6 x 32 x 32 uint8 maps + fp16 logits)."""
    out = {}
    for factor in (1, 10):
        root = work / f"mem{factor}"
        root.mkdir()
        n = rows * factor
        maps = np.lib.format.open_memmap(root / "maps.npy", "w+", np.uint8, (n, 6, 32, 32))
        maps[:] = 7
        maps.flush()
        logits = np.lib.format.open_memmap(root / "logits.npy", "w+", np.float16, (n, 10))
        logits[:] = 1
        logits.flush()
        del maps, logits
        probe = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(root), str(n), str(reads)],
            check=True,
            capture_output=True,
            text=True,
        )
        out[n] = json.loads(probe.stdout)
        out[n]["cache_mb"] = sum(p.stat().st_size for p in root.iterdir()) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=6, help="batches timed per mode and round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds of all modes")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher_cfg = load_config(
            "teacher",
            [
                *overrides(work, args.size),
                f"run.dir={work / 'teacher'}",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
            ],
        )
        teacher_ckpt = str(fit(teacher_cfg))
        io = io_benchmark(work, args.size, teacher_ckpt)
        steps = step_benchmark(work, args.size, args.steps, args.rounds, teacher_ckpt)
        memory = memory_benchmark(work, rows=20000, reads=20000)
    b = steps["batch_size"]
    print(
        f"\n## Student step time ({args.size} px, batch {b}, CPU; {args.rounds} interleaved "
        f"rounds of {args.steps} steps per mode: median over rounds of each round's median)\n"
    )
    print("| mode | s/step | ratio to no-KD: median | min - max over rounds |\n|---|---|---|---|")
    for mode in MODES:
        ratios = steps["ratios"][mode]
        print(
            f"| {mode} | {steps[mode]:.3f} | {statistics.median(ratios):.3f} | "
            f"{min(ratios):.3f} - {max(ratios):.3f} |"
        )
    student_fwd_bwd = steps["none"]
    expected = (steps["teacher_forward"] + student_fwd_bwd) / student_fwd_bwd
    print(
        f"\nonline/cached = {steps['online'] / steps['cached']:.2f}; "
        f"(teacher forward + student step) / student step = {expected:.2f}"
    )
    print(
        f"parameters: teacher {steps['teacher_params']:,}, student {steps['student_params']:,} "
        f"({steps['student_params'] / steps['teacher_params']:.3f} of the teacher)"
    )
    print(f"\n## Cache I/O ({io['samples']} samples)\n")
    print("| measure | samples/s |\n|---|---|")
    print(f"| cache-teacher write (teacher forward included) | {io['write_samples_per_s']:.1f} |")
    print(
        f"| read + join + augment (loader, 1 process) | {io['read_join_augment_samples_per_s']:.1f} |"
    )
    print(f"| same loader without teacher outputs | {io['no_teacher_augment_samples_per_s']:.1f} |")
    print(f"| student consumption (no-KD step) | {b / steps['none']:.1f} |")
    print(
        f"\nbytes per sample: {io['bytes_per_sample']} (total {sum(io['bytes_per_sample'].values())})"
    )
    print("\n## Memory while reading 20,000 random rows\n")
    print(
        "| cache rows | cache MB | anonymous RSS MB | file-backed RSS MB | peak RSS MB |\n|---|---|---|---|---|"
    )
    for rows, m in memory.items():
        print(
            f"| {rows:,} | {m['cache_mb']:.0f} | {m['rss_anon_mb']:.1f} | {m['rss_file_mb']:.1f} | {m['peak_rss_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
