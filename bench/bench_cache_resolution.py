"""Thin structures in the teacher cache: what each dense-map cache size keeps, and what it costs.

Why: a dense teacher map stored smaller than the working size is averaged down when cached and
brought back up when the loader reads it; a vessel thinner than a cache pixel fades below 0.5
and the student is taught that it is absent (a user measured vessel Dice 0.682 distilled from a
32 px cache vs 0.722 without KD at 384 px). This benchmark needs no trained teacher: a perfect
teacher, the synthetic ground-truth masks at the working size, goes through the cache's own
encode / decode / resize path (``MapFidelity``, as ``cache-teacher`` measures it). Printed per
cache size: the Dice each channel keeps, and bytes per sample (uint8).

``--students E`` also distils the same student for E epochs from a cache at each size (a third
of the working size, the old default, and the working size) and trains it without KD, and
prints the students' test Dice: the cost of a lossy cache in what the student learns. The
teacher is trained here on 240 images unless ``--teacher CKPT`` names one (e.g. the demo's,
``runs/teacher/checkpoints/best.ckpt``: the students then train on the default synthetic data,
as the demo's do).

    .venv/bin/python bench/bench_cache_resolution.py [--size 96] [--students 0] [--teacher CKPT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.synthetic_runs import synthetic_overrides  # noqa: E402
from data_modules.datamodule import FundusDataModule  # noqa: E402
from data_modules.synthetic import generate_synthetic  # noqa: E402
from mtkd.kd.fidelity import KEPT_DICE_WARNING, MapFidelity  # noqa: E402
from mtkd.kd.storage import CacheStorage  # noqa: E402
from mtkd.markdown import markdown_table  # noqa: E402
from mtkd.run_config import load_config  # noqa: E402
from mtkd.stages import cache_teacher, evaluate, fit  # noqa: E402
from mtkd.tasks import build_tasks  # noqa: E402

DENSE = ("anatomy", "lesions")
#: synthetic photographs the fidelity table reads and a teacher trained here learns from
IMAGES = 240


def fidelity_table(work: Path, size: int, cache_sizes: list[int]) -> None:
    cfg = load_config("distill", synthetic_overrides(work, size, IMAGES))
    tasks = build_tasks({n: dict(cfg.tasks[n]) for n in DENSE})
    dataset = FundusDataModule(cfg.data, tasks).dataset("train")
    maps = {n: torch.stack([dataset[i]["targets"][n] for i in range(len(dataset))]) for n in DENSE}
    print(
        f"\n## Teacher-map fidelity by cache size ({size} px working size, {len(dataset)} "
        f"synthetic training images; teacher = ground-truth masks; Dice at 0.5 of the cached "
        f"map read back at {size} px vs the teacher's; warning below {KEPT_DICE_WARNING})\n"
    )
    channels = [(n, c) for n in DENSE for c in tasks[n].channel_names()]
    rows = []
    for cache_size in cache_sizes:
        storage = CacheStorage(dense_size=cache_size)
        fidelity = MapFidelity()
        for n, task in tasks.items():
            fidelity.update(n, task, maps[n], task.encode_cache(maps[n], storage))
        kept = fidelity.kept_dice()
        cells = []
        for n, c in channels:
            index = tasks[n].channel_names().index(c)
            cells.append(f"{kept[n].get(index, float('nan')):.3f}" if n in kept else "1.000")
        nbytes = sum(int(torch.tensor(t.cache_shape(storage)).prod()) for t in tasks.values())
        rows.append([cache_size, *cells, f"{nbytes:,}"])
    header = ["cache size", *(f"{n}/{c}" for n, c in channels), "bytes/sample"]
    print(markdown_table(header, rows))


def student_table(
    work: Path, size: int, cache_sizes: list[int], epochs: int, teacher: str | None
) -> None:
    """The same student from each cache size and without KD, taught by ``teacher`` (trained
    here when None)."""
    if teacher is None:
        base = synthetic_overrides(work, size, IMAGES)
        teacher = str(fit(load_config("teacher", [*base, f"run.dir={work / 'teacher'}"])))
    else:
        base = [f"data.image_size={size}", "logger=none", "trainer.enable_progress_bar=false"]
    arms = {f"KD, cache {s} px": [f"cache.dense_size={s}"] for s in cache_sizes}
    arms["no KD"] = ["kd=none"]
    rows = {}
    for name, extra in arms.items():
        run, cache = work / name.replace(" ", "_").replace(",", ""), work / f"cache_{name}"
        if "kd=none" not in extra:
            cache_teacher(
                load_config(
                    "distill",
                    [*base, *extra, f"cache.teacher=[{teacher}]", f"kd.cache_dir={cache}"],
                )
            )
        student = fit(
            load_config(
                "distill",
                [
                    *base,
                    *extra,
                    f"trainer.max_epochs={epochs}",
                    f"run.dir={run}",
                    f"kd.cache_dir={cache}",
                    f"kd.teacher={teacher}",
                ],
            )
        )
        rows[name] = evaluate(str(student), "test", [*base, "logger=none"], bootstrap=0)
    teacher_metrics = evaluate(str(teacher), "test", [*base, "logger=none"], bootstrap=0)
    keys = ["anatomy/dice_vessels", "anatomy/dice_optic_disc", "anatomy/dice", "lesions/dice"]
    print(f"\n## Student test Dice by teacher-cache size ({size} px, {epochs} student epochs)\n")
    table = [
        [name, *(f"{metrics[f'test/{k}']:.3f}" for k in keys)]
        for name, metrics in {"teacher": teacher_metrics, **rows}.items()
    ]
    print(markdown_table(["arm", *keys], table))
    (work / "students.json").write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96, help="working size (data.image_size)")
    parser.add_argument("--students", type=int, default=0, help="student epochs (0: skip)")
    parser.add_argument("--teacher", default=None, help="a trained teacher for --students")
    args = parser.parse_args()
    cache_sizes = sorted({args.size // 4, args.size // 3, args.size // 2, args.size})
    with tempfile.TemporaryDirectory(prefix="mtkd-bench-") as tmp:
        work = Path(tmp)
        generate_synthetic(work / "synth", n=IMAGES, image_size=256, seed=0, progress=False)
        fidelity_table(work, args.size, cache_sizes)
        if args.students:
            student_table(work, args.size, [args.size // 3, args.size], args.students, args.teacher)


if __name__ == "__main__":
    main()
