"""Frozen teacher checkpoints behind one forward: the cache writer's predict module and the
online-KD teacher.

Teachers may be specialists: each has its own task set, encoder, image size and normalisation.
Each task of the run is taught by the teachers that have it (averaged by
``Task.combine_teachers``); each teacher sees the images at its own size and normalisation, and its
outputs come back at the run's geometry, so the cache and the loader never know it was several.
So a student can be distilled at a lower working size than its teacher (cross-resolution
distillation): the teacher still sees its own size, the cache holds its outputs at the student's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn

from data_modules.preprocess import preprocess_steps
from mtkd.kd.cache import file_sha256, source_reach, sources_note, teaches_source
from mtkd.models.pretrained import Normalisation
from mtkd.modules.checkpoint import load_net, read_tasks
from mtkd.status import status_logger
from mtkd.tasks import Task, build_tasks
from mtkd.tasks.base import resize

log = status_logger(__name__)


@dataclass(frozen=True)
class TeacherEntry:
    """A teacher checkpoint and the tasks it teaches: None (all of its tasks), a list (those),
    or a map teacher task -> the run's task (a rename); and the data sources whose images it
    teaches (None: all)."""

    path: str
    tasks: list[str] | dict[str, str] | None = None
    sources: list[str] | None = None

    def teaches(self, source: str) -> bool:
        return teaches_source(self.sources, source)

    def mapping(self, have: Sequence[str]) -> dict[str, str]:
        """Teacher task -> run task; a named task the checkpoint lacks is an error."""
        if self.tasks is None:
            return {n: n for n in have}
        wanted = dict(self.tasks) if isinstance(self.tasks, dict) else {n: n for n in self.tasks}
        missing = sorted(set(wanted) - set(have))
        if missing:
            raise ValueError(
                f"teacher {self.path} has no task {missing} (it has {sorted(have)}); fix the "
                "tasks of its kd.teachers entry"
            )
        return wanted


def configured_teachers(listed: Any, whole: Sequence[str]) -> list[TeacherEntry]:
    """The run's teachers: the ``kd.teachers`` list when it has entries, else each checkpoint of
    ``whole`` (repeated ``teacher=``, ``kd.teacher``) with all its tasks."""
    if listed:
        plain = OmegaConf.to_container(listed) if OmegaConf.is_config(listed) else listed
        return [TeacherEntry(str(e["path"]), e.get("tasks"), e.get("sources")) for e in plain]
    return [TeacherEntry(str(p)) for p in whole]


def distill_teachers(kd: Any) -> list[TeacherEntry]:
    """The teachers a distill run's ``kd`` config names: ``kd.teachers``, else ``kd.teacher``
    (online KD and the cache check; cache-teacher reads ``cache.teacher`` instead)."""
    return configured_teachers(kd.teachers, [kd.teacher] if kd.teacher else [])


class Renormalise(nn.Module):
    """Images normalised with the run's mean/std -> the normalisation a teacher was trained with
    (an exact affine map, so a teacher on [-1, 1] inputs can teach a student on ImageNet ones)."""

    def __init__(self, given: Normalisation, wanted: Normalisation) -> None:
        super().__init__()
        m0, s0 = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in given)
        m1, s1 = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in wanted)
        self.identity = bool(torch.equal(m0, m1) and torch.equal(s0, s1))
        # x1 = ((x0 * s0 + m0) - m1) / s1
        self.register_buffer("scale", s0 / s1, persistent=False)
        self.register_buffer("shift", (m0 - m1) / s1, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.identity else image * self.scale + self.shift


def assign(
    entries: Sequence[TeacherEntry],
    teacher_tasks: Sequence[dict[str, Task]],
    run_tasks: dict[str, Task] | None,
) -> tuple[dict[str, list[tuple[int, str]]], list[str]]:
    """Which teachers teach which run task: ({run task: [(teacher index, teacher task)]}, notes).

    ``run_tasks`` None takes every teacher task. Two teachers (or a teacher and the run) that
    define one task differently are refused with both definitions."""
    sources: dict[str, list[tuple[int, str]]] = {}
    notes = []
    for i, (entry, tasks) in enumerate(zip(entries, teacher_tasks)):
        for theirs, ours in entry.mapping(list(tasks)).items():
            if run_tasks is not None and ours not in run_tasks:
                notes.append(
                    f"teacher {entry.path}: task {theirs!r} is not a task of this run; ignored"
                )
                continue
            sources.setdefault(ours, []).append((i, theirs))
    for ours, taught in sources.items():
        first, first_task = taught[0]
        want = teacher_tasks[first][first_task].identity()
        for i, theirs in taught[1:]:
            other = teacher_tasks[i][theirs].identity()
            if other != want:
                raise ValueError(
                    f"task {ours!r} is defined differently by teacher {entries[first].path} "
                    f"({want}) and teacher {entries[i].path} ({other}); use teachers that agree, "
                    "or take the task from one of them (the tasks of its kd.teachers entry)"
                )
        if run_tasks is not None and run_tasks[ours].identity() != want:
            raise ValueError(
                f"teacher {entries[first].path} defines task {ours!r} as {want} but this run "
                f"configures {run_tasks[ours].identity()}; configure the task as the teacher was "
                "trained, or leave it out of that teacher's kd.teachers entry"
            )
    return sources, notes


def combine_per_source(
    task: Task,
    each: list[torch.Tensor],
    teachers: Sequence[TeacherEntry],
    sources: Sequence[str] | None,
) -> torch.Tensor:
    """``task.combine_teachers`` of the teachers' outputs ``each``, per image only over the
    teachers that teach its source. An image no teacher teaches keeps the first teacher's output
    as a placeholder: ``taught_masks`` leaves it out of the KD loss."""
    if sources is None or all(t.sources is None for t in teachers):
        return task.combine_teachers(each)
    rows_of: dict[tuple[bool, ...], list[int]] = {}
    for row, source in enumerate(sources):
        rows_of.setdefault(tuple(t.teaches(source) for t in teachers), []).append(row)
    combined = each[0].clone()
    for pattern, rows in rows_of.items():
        chosen = [output[rows] for output, on in zip(each, pattern) if on]
        if chosen:
            combined[rows] = task.combine_teachers(chosen)
    return combined


def plan_teaching(
    entries: Sequence[TeacherEntry],
    teacher_tasks: Sequence[dict[str, Task]],
    configs: Sequence[Any],
    run_tasks: dict[str, Any] | None,
    data: Any | None,
) -> tuple[dict[str, list[tuple[int, str]]], dict[str, Task], list[str]]:
    """From the teachers' tasks and saved ``configs`` alone: which teachers teach which run task
    (``assign``), the run's tasks some teacher teaches (what is cached) and the notes to show.
    ``run_tasks``: the run's task specs (None: every teacher task); ``data``: the run's data
    config (None: no size or preprocessing notes)."""
    wanted = build_tasks(run_tasks) if run_tasks is not None else None
    taught_by, notes = assign(entries, teacher_tasks, wanted)
    tasks = {
        ours: wanted[ours] if wanted else teacher_tasks[i][theirs]
        for ours, [(i, theirs), *_] in taught_by.items()
    }
    if not tasks:
        raise ValueError(
            f"the teachers {[e.path for e in entries]} teach none of this run's tasks "
            f"{sorted(wanted or {})}; pass teachers trained for them"
        )
    if data is not None:
        sizes = [int(c.data.image_size) for c in configs]
        notes += size_notes(entries, sizes, int(data.image_size))
        notes += preprocessing_notes(entries, configs, data)
    return taught_by, tasks, notes


def provenance(
    entries: Sequence[TeacherEntry],
    taught_by: dict[str, list[tuple[int, str]]],
    run_tasks: Sequence[str],
) -> dict[str, list[dict[str, str]]]:
    """For each of ``run_tasks``: the teacher files that produce it, [{path, sha256, task
    (the teacher's name for it)}], empty for a task no teacher covers."""
    files = {e.path: str(Path(e.path).resolve()) for e in entries}
    hashes = {p: file_sha256(p) for p in files}
    return {
        name: [
            {
                "path": files[entries[i].path],
                "sha256": hashes[entries[i].path],
                "task": t,
                **({"sources": entries[i].sources} if entries[i].sources else {}),
            }
            for i, t in taught_by.get(name, [])
        ]
        for name in run_tasks
    }


def teacher_provenance(
    entries: Sequence[TeacherEntry], run_tasks: dict[str, Any], data: Any, names: Sequence[str]
) -> tuple[dict[str, list[dict[str, str]]], list[str]]:
    """``TeacherEnsemble(entries, run_tasks, data)``'s ``provenance(names)`` and notes without
    building it: read from the checkpoints' saved configs (tensors mapped, never loaded) and one
    hash of each file, which is what a teacher cache check compares."""
    read = [read_tasks(e.path) for e in entries]
    taught_by, _, notes = plan_teaching(
        entries, [t for t, _ in read], [c for _, c in read], run_tasks, data
    )
    return provenance(entries, taught_by, names), notes


class TeacherEnsemble(L.LightningModule):
    def __init__(
        self,
        teachers: Sequence[str | TeacherEntry],
        run_tasks: dict[str, Any] | None = None,
        data: Any | None = None,
        map_stride: int | None = None,
    ) -> None:
        """``run_tasks``: the run's task specs (None: every teacher task); ``data``: the run's
        data config, whose normalisation the images arrive in (None: each teacher's own);
        ``map_stride``: the stride of the feature maps ``predict_step`` returns for the cache
        (dense feature KD; None: none)."""
        super().__init__()
        if not teachers:
            raise ValueError("no teacher checkpoint given; pass teacher=<path/to/teacher.ckpt>")
        self.entries = [
            t if isinstance(t, TeacherEntry) else TeacherEntry(str(t)) for t in teachers
        ]
        loaded = [load_net(e.path) for e in self.entries]
        self.teacher_tasks = [tasks for _, tasks, _ in loaded]
        configs = [c for _, _, c in loaded]
        #: tasks: the run's tasks some teacher teaches (what is cached); the others train on
        #: labels only
        self.taught_by, self.tasks, self.notes = plan_teaching(
            self.entries, self.teacher_tasks, configs, run_tasks, data
        )
        self.nets = nn.ModuleList([net for net, _, _ in loaded])
        self.sizes = [int(c.data.image_size) for c in configs]
        own = [(tuple(c.data.mean), tuple(c.data.std)) for c in configs]
        given = [(tuple(data.mean), tuple(data.std)) if data is not None else o for o in own]
        self.inputs = nn.ModuleList([Renormalise(g, o) for g, o in zip(given, own)])
        self.map_stride = map_stride
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TeacherEnsemble:
        # A teacher stays in eval mode (BatchNorm statistics frozen), even inside a training loop.
        return super().train(False)

    @torch.no_grad()
    def forward(
        self, image: torch.Tensor, sources: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Teacher outputs for the run's covered tasks, dense maps at the input's size."""
        return self.predict_with_features(image, sources)[0]

    @property
    def feature_dims(self) -> list[int]:
        """Each teacher's embedding length (its net's pooled vector), in teacher order."""
        return [net.pooled_dim for net in self.nets]

    def map_shapes(self, size: int) -> list[list[int]]:
        """Each teacher's feature map as ``predict_step`` returns it for ``size`` px images:
        [channels, size / stride, size / stride], in teacher order (``map_stride`` set)."""
        stride = int(self.map_stride)
        return [[net.map_channels(stride), size // stride, size // stride] for net in self.nets]

    @torch.no_grad()
    def predict_with_features(
        self,
        image: torch.Tensor,
        sources: Sequence[str] | None = None,
        map_stride: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``forward``'s outputs, each teacher's embedding of the image (B x its
        ``pooled_dim``) and, given ``map_stride``, its encoder feature map at that stride (else
        none), in teacher order: what feature-level KD (``kd.features``) matches. A map comes
        back at the input's size / stride whatever size the teacher was fed, as its outputs do.
        ``sources``: each image's data source, so that a task is combined only from the teachers
        that teach that source (``kd.teachers[i].sources``; ``reach`` says where none does)."""
        size = tuple(image.shape[-2:])
        ran = [
            net.forward_with_features(resize(renorm(image), (s, s)), map_stride)
            for net, renorm, s in zip(self.nets, self.inputs, self.sizes)
        ]
        raw = [outputs for outputs, _, _ in ran]
        outputs = {}
        for ours, taught in self.taught_by.items():
            task = self.tasks[ours]
            each = [
                task.teacher_at(self.teacher_tasks[i][theirs].teacher_output(raw[i][theirs]), size)
                for i, theirs in taught
            ]
            teachers = [self.entries[i] for i, _ in taught]
            outputs[ours] = combine_per_source(task, each, teachers, sources)
        maps = []
        if map_stride is not None:
            grid = (size[0] // map_stride, size[1] // map_stride)
            maps = [resize(feature_map, grid) for _, _, feature_map in ran]
        return outputs, [pooled for _, pooled, _ in ran], maps

    @property
    def reach(self) -> dict[str, list[list[str] | None]]:
        """The tasks and embeddings taught on some data sources only (``source_reach``)."""
        return source_reach(
            {n: [self.entries[i].sources for i, _ in t] for n, t in self.taught_by.items()},
            [e.sources for e in self.entries],
        )

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """The cache writer's input: outputs, embeddings and (``map_stride`` set) feature maps."""
        outputs, features, maps = self.predict_with_features(
            batch["image"], batch.get("source"), self.map_stride
        )
        return {
            "sample_id": batch["sample_id"],
            "outputs": outputs,
            "features": features,
            "maps": maps,
        }

    def provenance(self, run_tasks: Sequence[str]) -> dict[str, list[dict[str, str]]]:
        """``provenance`` of this ensemble's teachers."""
        return provenance(self.entries, self.taught_by, run_tasks)


def size_notes(entries: Sequence[TeacherEntry], sizes: Sequence[int], run: int) -> list[str]:
    """For each teacher trained at another working size than the run's, the size it is fed and the
    one its outputs come back at (a student distilled at 96 px from a 128 px teacher)."""
    return [
        f"teacher {entry.path}: fed {size} px images (its own working size, resized from the "
        f"run's {run} px); outputs brought back to {run} px (the run's data.image_size)"
        for entry, size in zip(entries, sizes)
        if size != run
    ]


def preprocessing_notes(
    entries: Sequence[TeacherEntry], configs: Sequence[Any], data: Any
) -> list[str]:
    """Preprocessing a teacher was trained with that the run does differently: image size and
    normalisation are converted from the tensor, these steps cannot be."""
    notes = []
    ours = preprocess_steps(data.preprocess)
    for entry, cfg in zip(entries, configs):
        for step, theirs in preprocess_steps(cfg.data.preprocess).items():
            if theirs != ours[step]:
                notes.append(
                    f"teacher {entry.path} was trained with data.preprocess.{step}={theirs}, this "
                    f"run has {ours[step]}: it sees the run's images (only size and normalisation are "
                    "converted)"
                )
    return notes


def announce(taught: dict[str, list[dict[str, str]]], notes: Sequence[str] = ()) -> None:
    """Say which teachers teach which task, and the tasks that train on labels only."""
    lines = ["teachers per task:"]
    for name, files in taught.items():
        who = ", ".join(
            f"{f['path']}" + (f" ({f['task']})" if f["task"] != name else "") + sources_note(f)
            for f in files
        )
        lines.append(f"  {name:<14} <- {who or 'no teacher: trained on labels only (kd alpha 0)'}")
    lines.extend(f"  note: {note}" for note in notes)
    log.info("\n".join(lines))
