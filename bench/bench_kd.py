"""Distillation benchmarks, measured side by side in one process on this machine.

1. Student training-step time (forward + backward + optimizer; loader excluded): cached KD
   over no KD, and "cached_before" (the textbook KD losses the fused ones replaced) in the same
   run; online KD in a block of its own.
2. Cache write throughput (cache-teacher) and the loader's read + join + augmentation rate per
   process and core, with and without teacher maps; bytes per sample.
3. Memory: anonymous (heap) memory of reading a cache does not grow with the cache size:
   the same reads against a cache 10x larger.

    flock /tmp/mtkd-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python bench/bench_kd.py --size 96
    ... bench/bench_kd.py --io-only --size 512 --images 64 [--dense-size 512 32]

Each batch runs every arm back to back (order rotated per batch), and the ratio is taken per
such pair: the machine's speed drifts over seconds (other jobs on the 2 shared cores), so
ratios over rounds of several steps per mode still differed by 7 % between two runs; per-pair
ratios' median, IQR and a ~95 % interval of the median show whether 2 % is resolved.

Prints Markdown tables (copied into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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

from bench.synthetic_runs import synthetic_overrides  # noqa: E402
from data_modules.datamodule import FundusDataModule  # noqa: E402
from mtkd.config import to_container  # noqa: E402
from mtkd.kd.cache import TeacherCache  # noqa: E402
from mtkd.kd.teacher_source import build_teacher_source  # noqa: E402
from mtkd.markdown import markdown_table  # noqa: E402
from mtkd.models.multitask import count_parameters  # noqa: E402
from mtkd.modules.student import StudentModule  # noqa: E402
from mtkd.run_config import apply_overrides, load_config  # noqa: E402
from mtkd.stages import cache_teacher, fit, open_checked_cache  # noqa: E402
from mtkd.tasks import register_kd_loss  # noqa: E402
from mtkd.tasks.base import elementwise_loss  # noqa: E402
from tests.textbook_losses import reference_kl_dice, reference_point_loss  # noqa: E402

#: the "before" arm: the textbook KD losses the fused ones replaced (tests/textbook_losses.py,
#: the reference tests/test_kd_loss_fused.py checks value and gradient against), registered here
#: only, so one run measures before and after; the supervised losses are today's in every arm
REFERENCE_KD = "reference"


@register_kd_loss("segmentation", REFERENCE_KD)
def reference_kl_dice_kd(task, pred: torch.Tensor, teacher: torch.Tensor, temperature: float):
    teacher = task.teacher_at(teacher, tuple(pred.shape[-2:]))
    return reference_kl_dice(pred, teacher, temperature, task.spec.dice_weight)


@register_kd_loss("localization", REFERENCE_KD)
def reference_heatmap_kd(task, pred: torch.Tensor, teacher: torch.Tensor, temperature: float):
    if not task.dense:
        return elementwise_loss(pred, teacher, "mse")
    return reference_point_loss(pred, teacher, "mse", task.spec.sigma, task.spec.heatmap_weight)


#: arm -> (teacher source, KD loss of the dense tasks: None for the kind's default)
ARMS = {
    "none": ("none", None),
    "cached": ("cached", None),
    "cached_before": ("cached", REFERENCE_KD),
    "online": ("online", None),
}


def one_step(student: StudentModule, opt, batch: dict) -> float:
    """Seconds of one forward + backward + optimizer step."""
    start = time.perf_counter()
    opt.zero_grad()
    loss, _ = student.step_losses(batch)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def arm_student(cfg, arm: str, cache: TeacherCache, template: StudentModule):
    """One arm's student, built with its teacher source and its dense tasks' KD loss, holding
    the template's weights, and its own optimizer."""
    mode, loss = ARMS[arm]
    dense = [n for n, t in template.tasks.items() if t.kind in ("segmentation", "localization")]
    losses = [f"kd.tasks.{n}.loss={loss}" for n in dense] if loss else []
    arm_cfg = apply_overrides(cfg, [f"kd.mode={mode}", *losses])
    student = StudentModule(to_container(arm_cfg), build_teacher_source(mode, cache))
    student.load_state_dict(template.state_dict())
    student.teacher_source.setup(arm_cfg)
    return student, torch.optim.AdamW(student.parameters(), lr=1e-4)


def paired_steps(
    arms: dict[str, tuple[StudentModule, torch.optim.Optimizer]],
    batches: list[dict],
    rounds: int,
    repeats: int,
) -> dict[str, list[float]]:
    """Per arm, its step time over the first arm's on the same batch: each batch runs every arm
    in a row ``repeats`` times (the order rotated per batch and round) and each arm keeps its
    fastest step, since another job on the shared cores only ever adds time; the machine's
    drift over seconds then cancels in each ratio. Python's cycle collector runs between
    batches, not inside a timed step. Two warm-up steps per arm first."""
    names = list(arms)
    for arm in names:
        for batch in batches[:2]:
            one_step(*arms[arm], batch)
    ratios: dict[str, list[float]] = {arm: [] for arm in names[1:]}
    times: dict[str, list[float]] = {arm: [] for arm in names}
    gc.disable()
    try:
        for r in range(rounds):
            for i, batch in enumerate(batches):
                gc.collect()
                k = (r * len(batches) + i) % len(names)
                took: dict[str, float] = {}
                for _ in range(repeats):
                    for arm in names[k:] + names[:k]:
                        step = one_step(*arms[arm], batch)
                        took[arm] = min(took.get(arm, math.inf), step)
                for arm in names:
                    times[arm].append(took[arm])
                for arm in names[1:]:
                    ratios[arm].append(took[arm] / took[names[0]])
    finally:
        gc.enable()
    return {"ratios": ratios, "times": times}


def step_benchmark(
    work: Path,
    size: int,
    images: int,
    extra: list[str],
    steps: int,
    rounds: int,
    online_rounds: int,
    repeats: int,
    teacher_ckpt: str,
) -> dict:
    cfg = load_config(
        "distill", [*synthetic_overrides(work, size, images), f"kd.teacher={teacher_ckpt}", *extra]
    )
    template = StudentModule(to_container(cfg))
    cache = open_checked_cache(cfg, template.tasks)
    dm = FundusDataModule(cfg.data, template.tasks, teacher=cache)
    loader = dm.train_dataloader()
    batches = [b for _, b in zip(range(steps), loader)]

    def students(*names: str) -> dict:
        return {arm: arm_student(cfg, arm, cache, template) for arm in names}

    # online KD in its own block: its teacher forward would otherwise sit between the pairs
    cached = paired_steps(students("none", "cached", "cached_before"), batches, rounds, repeats)
    online_arms = students("none", "online")
    online = paired_steps(online_arms, batches, online_rounds, repeats)
    teacher = online_arms["online"][0].teacher_source.ensemble
    x = batches[0]["image"]
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(3):
            teacher(x)
        teacher_forward = (time.perf_counter() - t0) / 3
    return {
        "ratios": {**cached["ratios"], **online["ratios"]},
        "seconds": {arm: statistics.median(t) for arm, t in cached["times"].items()}
        | {"online": statistics.median(online["times"]["online"])},
        "teacher_forward": teacher_forward,
        "student_params": count_parameters(template.net),
        "teacher_params": count_parameters(teacher.nets),
        "batch_size": int(x.shape[0]),
    }


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles, range, and a distribution-free ~95 % interval of the median (order
    statistics n/2 -+ 0.98 sqrt(n))."""
    v = sorted(values)
    n = len(v)
    q1, median, q3 = statistics.quantiles(v, n=4, method="inclusive") if n > 1 else (v[0],) * 3
    half = 0.98 * math.sqrt(n)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return {
        "median": statistics.median(v),
        "q1": q1,
        "q3": q3,
        "min": v[0],
        "max": v[-1],
        "ci_lo": v[lo],
        "ci_hi": v[hi],
        "n": n,
    }


def io_benchmark(work: Path, size: int, images: int, teacher_ckpt: str, extra: list[str]) -> dict:
    """Cache write, then the training dataset's samples/s in this process (read + join +
    augmentation; ``--threads`` threads, the loader workers' one by default) with the teacher
    cache and without it, two passes each after a warm-up sample."""
    cfg = load_config(
        "distill",
        [*synthetic_overrides(work, size, images), f"cache.teacher=[{teacher_ckpt}]", *extra],
    )
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
        for _ in range(2):
            for i in range(len(ds)):
                ds[i]
        timings[name] = 2 * len(ds) / (time.perf_counter() - start)
    return {
        "samples": n,
        "train_samples": len(with_cache),
        "dense_size": cfg.cache.dense_size,
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
    """Read ``reads`` random rows of a cache with ``rows`` and 10x ``rows`` samples (6 x 32 x 32
    uint8 maps + fp16 logits per row: whatever the row size, the process's own memory must
    not grow with the row count)."""
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


def fit_teacher(work: Path, size: int, images: int) -> str:
    """A teacher trained two batches: its outputs only need the cache's shapes and a forward's
    cost, not quality."""
    cfg = load_config(
        "teacher",
        [
            *synthetic_overrides(work, size, images),
            f"run.dir={work / 'teacher'}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
        ],
    )
    return str(fit(cfg))


def print_io(io: dict, size: int, threads: int, consumption: float | None) -> None:
    dense = io["dense_size"] or f"null (the working size, {size})"
    print(
        f"\n## Cache I/O ({size} px, cache.dense_size={dense}, {io['samples']} "
        f"samples cached, {io['train_samples']} read per pass; 1 process, {threads} thread(s))\n"
    )
    cached, plain = io["read_join_augment_samples_per_s"], io["no_teacher_augment_samples_per_s"]
    rows = [
        ["cache-teacher write (teacher forward included)", f"{io['write_samples_per_s']:.1f}"],
        ["read + join + augment (loader, per process)", f"{cached:.1f}"],
        ["same loader without teacher outputs", f"{plain:.1f}"],
    ]
    if consumption is not None:
        rows.append(["student consumption (no-KD step, this CPU)", f"{consumption:.1f}"])
    print(markdown_table(["measure", "samples/s"], rows))
    print(
        f"\n15 loader workers (a 16-core GPU machine, one core left to the training process) "
        f"could feed {15 * cached:.0f} samples/s with teacher maps ({15 * plain:.0f} without), "
        f"if each worker runs as fast as this one process on one core."
    )
    print(
        f"bytes per sample: {io['bytes_per_sample']} (total {sum(io['bytes_per_sample'].values())})"
    )


def print_ratio_table(steps: dict, arms: tuple[str, ...]) -> None:
    header = [
        "arm",
        "s/step (median)",
        "ratio to no-KD: median",
        "IQR",
        "min - max",
        "~95 % interval of the median",
        "pairs",
    ]
    rows = []
    for arm in arms:
        r = spread(steps["ratios"][arm])
        rows.append(
            [
                arm,
                f"{steps['seconds'][arm]:.3f}",
                f"{r['median']:.4f}",
                f"{r['q1']:.3f} - {r['q3']:.3f} ({r['q3'] - r['q1']:.3f})",
                f"{r['min']:.3f} - {r['max']:.3f}",
                f"{r['ci_lo']:.4f} - {r['ci_hi']:.4f}",
                r["n"],
            ]
        )
    print(markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=8, help="batches, each timed in every arm")
    parser.add_argument("--rounds", type=int, default=4, help="passes over the batches")
    parser.add_argument(
        "--repeats", type=int, default=3, help="back-to-back steps per arm and batch (min kept)"
    )
    parser.add_argument("--online-rounds", type=int, default=2, help="passes for online KD")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--io-only", action="store_true", help="only the cache I/O section")
    parser.add_argument("--images", type=int, default=200, help="synthetic images generated")
    parser.add_argument(
        "--dense-size",
        type=int,
        nargs="*",
        default=[],
        help="cache.dense_size values (default: the config's); --io-only measures each, the "
        "step benchmark the first",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    dense_sizes = args.dense_size or [None]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def extra(dense_size: int | None) -> list[str]:
            if dense_size is None:
                return []
            return [f"cache.dense_size={dense_size}", f"kd.cache_dir={work / f'cache{dense_size}'}"]

        teacher_ckpt = fit_teacher(work, args.size, args.images)
        torch.set_num_threads(args.threads)  # fit's thread budget may have set another
        if args.io_only:
            for dense_size in dense_sizes:
                io = io_benchmark(work, args.size, args.images, teacher_ckpt, extra(dense_size))
                print_io(io, args.size, args.threads, None)
            return
        io = io_benchmark(work, args.size, args.images, teacher_ckpt, extra(dense_sizes[0]))
        steps = step_benchmark(
            work,
            args.size,
            args.images,
            extra(dense_sizes[0]),
            args.steps,
            args.rounds,
            args.online_rounds,
            args.repeats,
            teacher_ckpt,
        )
        memory = memory_benchmark(work, rows=20000, reads=20000)
    b = steps["batch_size"]
    print(
        f"\n## Student step time ({args.size} px, batch {b}, CPU, {args.threads} thread(s); "
        f"per batch the arms back to back, {args.repeats} times, order rotated; ratio of "
        f"each arm's fastest step per batch; {args.rounds} rounds of {args.steps} batches)\n"
    )
    print_ratio_table(steps, ("cached", "cached_before", "online"))
    none = steps["seconds"]["none"]
    print(
        f"\nno-KD step {none:.3f} s; cached_before: the textbook KD losses (bench only); "
        f"online in its own block of {args.online_rounds} rounds; "
        f"(teacher forward + student step) / student step = "
        f"{(steps['teacher_forward'] + none) / none:.2f}"
    )
    print(
        f"parameters: teacher {steps['teacher_params']:,}, student {steps['student_params']:,} "
        f"({steps['student_params'] / steps['teacher_params']:.3f} of the teacher)"
    )
    print_io(io, args.size, args.threads, b / none)
    print("\n## Memory while reading 20,000 random rows\n")
    header = ["cache rows", "cache MB", "anonymous RSS MB", "file-backed RSS MB", "peak RSS MB"]
    table = [
        [f"{rows:,}", f"{m['cache_mb']:.0f}"]
        + [f"{m[k]:.1f}" for k in ("rss_anon_mb", "rss_file_mb", "peak_rss_mb")]
        for rows, m in memory.items()
    ]
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
