"""``mtkd demo [runs=DIR] [overrides]``: the newcomer's path, in one process, on the embedded
synthetic data: train the teacher, cache its outputs, distill the student, train the same student
without KD under the same budget, evaluate all three on the test split and write the report.

It shows the scenario KD exists for: labels are scarce, images are not. The teacher learns from
every label; both students see the labels of a tenth of the training patients
(``STUDENT_LABEL_FRACTION``), and the distilled one also learns the teacher's outputs on every
training image, labeled or not. The no-KD twin gets the same labels, images, epochs and seed.

Overrides apply to every stage (``mtkd demo trainer.max_epochs=1``). Where each stage writes is
the demo's business: everything goes under ``runs=DIR`` (default ``runs``), laid out like the
step-by-step commands (teacher/, teacher_cache/, student/, student_nokd/, report/). The demo
replaces the runs of an earlier demo there (``DIR/demo.json`` marks them as its own), and says
so; a run it did not write (``mtkd train-teacher`` into runs/teacher) is refused before any work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from data_modules.io import atomic_write_bytes
from mtkd.commands.reporting import Report, build_report
from mtkd.config import ConfigError
from mtkd.run_config import load_config
from mtkd.stages import (
    cache_teacher,
    evaluate,
    fit,
    held_checkpoints,
    pipeline_keys_taken,
    refuse_fast_dev_run,
)
from mtkd.status import status_logger

log = status_logger(__name__)

#: the demo's training runs under runs=DIR, which a later demo replaces
RUN_DIRS = ("teacher", "student", "student_nokd")
#: written into runs=DIR before the first stage: its RUN_DIRS hold the demo's own runs
MARKER = "demo.json"
#: the two students train for fewer epochs than the teacher (12 on the CPU profile) to keep the
#: demo short on 2 CPU cores (a clean clone's make demo: 481 s with the first install; 13 epochs
#: did not change the verdict of seeds 1-2, bench/RESULTS.md); a trainer.max_epochs override
#: applies to every stage instead
STUDENT_EPOCHS = 10
#: the share of training patients whose labels the students see (``data.label_fraction``): a
#: tenth, close to the reference scenario's 15 % (Chelaramani et al., WACV 2021). With a quarter
#: the no-KD twin learned the cup-to-disc ratio, glaucoma and the landmarks nearly as well as the
#: KD student, and KD won 4, 4 and 5 of the 7 tasks in seeds 0-2 (bench/RESULTS.md)
STUDENT_LABEL_FRACTION = 0.1
#: the KD student's weight on the teacher for its classification heads (``kd.tasks.<t>.alpha``;
#: 0.5 elsewhere). With a tenth of the labels a batch's supervised term comes from one or two
#: images; at 0.5 that noise kept the DR or DME head at its prior in 5 of 8 seeds, at 0.8 in 1
#: (``bash bench/stuck_heads.sh``, bench/RESULTS.md)
CLASSIFICATION_KD_ALPHA = 0.8


def trust_teacher(tasks: Any) -> list[str]:
    """The KD student's ``kd.tasks.<t>.alpha`` overrides: CLASSIFICATION_KD_ALPHA for each
    classification task of ``tasks`` (a config's task specs). bench/demo_variants.sh and
    bench/stuck_heads.sh read them from here too."""
    return [
        f"kd.tasks.{name}.alpha={CLASSIFICATION_KD_ALPHA}"
        for name, spec in tasks.items()
        if spec.kind == "classification"
    ]


@contextmanager
def stage(title: str, timings: dict[str, float]) -> Iterator[None]:
    """Say the stage's banner, then record its wall time."""
    log.info(f"\n{'=' * 72}\n== demo: {title}\n{'=' * 72}")
    start = time.perf_counter()
    yield
    timings[title] = time.perf_counter() - start


def claim_runs(root: Path) -> list[str]:
    """The overrides the demo's runs under ``root`` need: ``run.overwrite=true`` when an earlier
    demo left runs in RUN_DIRS (``root/demo.json`` marks them as its own), none for fresh
    folders. Runs there without the mark are someone else's (``mtkd train-teacher`` writes
    runs/teacher too) and are refused, naming them."""
    held = [root / name for name in RUN_DIRS if held_checkpoints(root / name)]
    if not held:
        return []
    if not (root / MARKER).is_file():
        raise ConfigError(
            f"{', '.join(map(str, held))} hold runs that the demo did not write (no "
            f"{root / MARKER}); give the demo a folder of its own with runs=DIR, or move them"
        )
    log.info(
        f"demo: replacing the runs an earlier demo left in {', '.join(map(str, held))} "
        "(runs=DIR writes a new demo elsewhere)"
    )
    return ["run.overwrite=true"]


def run_demo(overrides: list[str], runs: str | Path = "runs") -> tuple[Report, dict[str, float]]:
    """Run every stage; returns the report and the wall time of each stage in seconds."""
    taken = pipeline_keys_taken(overrides)
    if taken:
        raise ValueError(
            f"demo sets {taken} itself for each stage; choose the output folder with runs=DIR "
            "or run the stages one by one (mtkd train-teacher, cache-teacher, distill)"
        )
    root = Path(runs)
    cache = root / "teacher_cache"
    everywhere = [*overrides, *claim_runs(root)]
    teacher_cfg = load_config("teacher", [*everywhere, f"run.dir={root / 'teacher'}"])
    refuse_fast_dev_run(teacher_cfg, "demo")
    marker = {"command": "mtkd demo", "runs": list(RUN_DIRS), "overrides": overrides}
    atomic_write_bytes(root / MARKER, json.dumps(marker, indent=1).encode())
    students = [
        f"trainer.max_epochs={STUDENT_EPOCHS}",
        f"data.label_fraction={STUDENT_LABEL_FRACTION}",
        *everywhere,
    ]
    timings: dict[str, float] = {}
    with stage("1/6 train the teacher", timings):
        teacher = fit(teacher_cfg)
    with stage("2/6 cache the teacher's outputs", timings):
        cache_teacher(
            load_config(
                "distill",
                [*overrides, f"cache.teacher=[{teacher}]", f"kd.cache_dir={cache}"],
            )
        )
    with stage("3/6 distill the student (KD)", timings):
        student = fit(
            load_config(
                "distill",
                [
                    *students,
                    *trust_teacher(teacher_cfg.tasks),
                    f"run.dir={root / 'student'}",
                    f"kd.cache_dir={cache}",
                    f"kd.teacher={teacher}",
                ],
            )
        )
    with stage("4/6 train the same student without KD (baseline)", timings):
        baseline = fit(
            load_config("distill", [*students, "kd=none", f"run.dir={root / 'student_nokd'}"])
        )
    with stage("5/6 evaluate all three on the test split", timings):
        for ckpt in (teacher, student, baseline):
            evaluate(str(ckpt), "test", [])
    with stage("6/6 write the report", timings):
        report = build_report(
            {
                "teacher": root / "teacher",
                "student": root / "student",
                "baseline": root / "student_nokd",
            },
            root / "report",
        )
    return report, timings
