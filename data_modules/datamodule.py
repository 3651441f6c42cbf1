"""FundusDataModule: sources -> Sample records -> splits -> preprocessing -> batches.

Every batch follows one contract (docs/architecture.md): ``image``, ``sample_id``,
``targets[task]``, ``has[task]`` (which samples carry a label), ``pixel_scale`` and, when a
teacher cache is attached, ``teacher[task]`` transformed exactly like the image.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from data_modules.contract import Annotation, DatasetTask, TeacherOutputs
from data_modules.io import ref_digest
from data_modules.pack import augment, carriers, teacher_needs
from data_modules.preprocess import Preprocessor, mask_problems, original_size, source_sizes
from data_modules.samples import Sample, read_source
from data_modules.splits import assign_splits, load_splits, rank, save_splits
from data_modules.transforms import Augmentation, build_transform, view_seed


def read_sources(data_cfg: Any) -> list[Sample]:
    """Read every configured source, rename labels and assign splits (unless a split file is
    reused).

    Splits are assigned source by source: a source without a validation split gets one carved
    from its own training patients even when another source ships one, and an unlabeled source
    stays in train (it has nothing to validate or test).
    """
    reuse = bool(data_cfg.split_file) and Path(data_cfg.split_file).exists()
    samples: list[Sample] = []
    for name, src in data_cfg.sources.items():
        got = read_source(src.kind, src.root, dict(src.options))
        got = [dataclasses.replace(s, source=str(name)) for s in got]
        label_map = dict(src.label_map)
        got = [s.renamed(label_map) for s in got] if label_map else got
        if src.unlabeled:
            got = [
                dataclasses.replace(s, labels={}, masks={}, points={}, texts={}, split="train")
                for s in got
            ]
        elif not reuse:
            got = assign_splits(
                got,
                data_cfg.val_fraction,
                data_cfg.test_fraction,
                data_cfg.split_seed,
                data_cfg.stratify_on,
            )
        samples.extend(got)
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("two data sources produce the same sample ids; give each a distinct root")
    return samples


def load_samples(
    data_cfg: Any,
    run_dir: str | Path | None = None,
    tasks: dict[str, DatasetTask] | None = None,
    teacher_covers: bool = False,
    samples: SampleList | None = None,
) -> list[Sample]:
    """The configured samples, checked and split: ``samples`` read (a caller's ``SampleList``,
    which may have read and prepared them already), each label checked against ``tasks``
    (``check_labels``, before any image is read; ``teacher_covers`` says a teacher cache
    supervises every training sample, so a task without labels is KD-only instead of an error),
    then ``prepare_samples``, the splits saved in ``run_dir`` and the masks ``tasks`` read
    checked against their images' sizes (``check_masks``)."""
    samples = SampleList(data_cfg) if samples is None else samples
    if tasks is not None:
        check_labels(samples.read(), tasks, teacher_covers)
    prepared = samples.prepared()
    if run_dir is not None:
        save_splits(prepared, Path(run_dir) / "splits.json")
    if tasks is not None:
        check_masks(prepared, tasks)
    return prepared


def prepare_samples(data_cfg: Any, samples: list[Sample]) -> list[Sample]:
    """The read samples as a run uses them: the split file applied or written, bad images
    handled and the label fraction applied. Reads no label, so it needs no task."""
    reuse = bool(data_cfg.split_file) and Path(data_cfg.split_file).exists()
    if reuse:
        samples = load_splits(samples, data_cfg.split_file)
    elif data_cfg.split_file:
        save_splits(samples, data_cfg.split_file)
    # After the split file, which covers every sample of the sources, bad images included.
    samples = drop_bad_images(samples, data_cfg)
    if data_cfg.label_fraction < 1.0:
        samples = [_maybe_unlabel(s, data_cfg.label_fraction, data_cfg.split_seed) for s in samples]
    return samples


class SampleList:
    """One run's configured samples, read and prepared once: the teacher cache's check (the
    training images' digests), ``prepare_data`` and ``setup`` share them, so a fit reads and
    pre-scans the sources once. Build it before the data module when something must see the
    samples first, and hand it to ``FundusDataModule``."""

    def __init__(self, data_cfg: Any) -> None:
        self.cfg = data_cfg
        self._read: list[Sample] | None = None
        self._prepared: list[Sample] | None = None

    def read(self) -> list[Sample]:
        """The configured sources as read (``read_sources``)."""
        if self._read is None:
            self._read = read_sources(self.cfg)
        return self._read

    def prepared(self) -> list[Sample]:
        """The read samples after ``prepare_samples``."""
        if self._prepared is None:
            self._prepared = prepare_samples(self.cfg, self.read())
        return self._prepared

    def train_digests(self) -> dict[str, str]:
        """Each training sample id -> its image's content digest (``ref_digest``, hashed by the
        image pre-scan already): what a teacher cache records, so an image replaced in place
        after caching makes the cache stale."""
        return {s.sample_id: ref_digest(s.image) for s in self.prepared() if s.split == "train"}


def check_labels(
    samples: list[Sample], tasks: dict[str, DatasetTask], teacher_covers: bool
) -> None:
    """Refuse bad labels (each task kind's ``sample_problems``), all listed at once with the sample
    and its source row, and a task that no sample is labeled for: it would train with no
    supervision and no metric (KD-only when ``teacher_covers``, said once)."""
    problems, labeled = [], dict.fromkeys(tasks, 0)
    for s in samples:
        points = _normalised_points(s) if s.points else {}
        for name, task in tasks.items():
            found = task.sample_problems(s.labels, set(s.masks), points, s.texts)
            if found is not None:
                labeled[name] += 1
                where = s.origin or f"image {s.image}"
                problems += [f"  {s.sample_id} ({where}): task {name!r}: {p}" for p in found]
    if problems:
        shown = "\n".join(problems[:20]) + (
            f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""
        )
        raise ValueError(
            f"{len(problems)} bad label(s); fix or empty these cells in the source:\n{shown}"
        )
    for name in [n for n, count in labeled.items() if count == 0]:
        if teacher_covers:
            rank_zero_warn(
                f"task {name!r}: no sample carries a label for it; it is trained from the teacher "
                "cache only (KD-only) and has no validation metric"
            )
            continue
        found = {
            "labels": sorted({k for s in samples for k in s.labels}),
            "masks": sorted({k for s in samples for k in s.masks}),
            "points": sorted({k for s in samples for k in s.points}),
            "texts": sorted({k for s in samples for k in s.texts}),
        }
        raise ValueError(
            f"task {name!r}: no sample of the configured sources carries its label, so it would "
            f"train with no supervision and no metric. The sources provide {found}. Point the "
            f"task at one of these names, rename with data.sources.<source>.label_map, or drop "
            f"it with ~tasks.{name}"
        )


def check_masks(samples: list[Sample], tasks: dict[str, DatasetTask]) -> None:
    """Refuse the masks ``tasks`` read that do not match their image's size (or cannot be read),
    every one listed at once with its sample, instead of failing mid-epoch (``mask_problems``,
    from the file headers)."""
    names = sorted({m for t in tasks.values() for m in t.required_masks()})
    bad = mask_problems(samples, names)
    if not bad:
        return
    lines = [
        f"  {s.sample_id}{f' ({s.origin})' if s.origin else ''}: {bad[s.sample_id]}"
        for s in samples
        if s.sample_id in bad
    ]
    shown = "\n".join(lines[:20]) + (f"\n  ... {len(lines) - 20} more" if len(lines) > 20 else "")
    raise ValueError(
        f"{len(bad)} sample(s) have masks that do not match their image (a mask must have its "
        f"image's size); replace those masks or remove their samples from the source:\n{shown}"
    )


def drop_bad_images(samples: list[Sample], data_cfg: Any) -> list[Sample]:
    """Decode every image once before any work (``Preprocessor.bad_images``, cached with the
    preprocessing): with ``data.on_bad_image=error`` every bad file is listed at once with its
    sample; with ``skip`` each is warned about, with the count, and its sample left out."""
    pp = data_cfg.preprocess
    bad = Preprocessor(data_cfg.image_size, cache_dir=pp.cache_dir).bad_images(samples)
    if not bad:
        return samples
    lines = "\n".join(
        f"  {s.sample_id}{f' ({s.origin})' if s.origin else ''}: {bad[s.sample_id]}"
        for s in samples
        if s.sample_id in bad
    )
    if data_cfg.on_bad_image == "skip":
        rank_zero_warn(
            f"data.on_bad_image=skip: leaving out {len(bad)} of {len(samples)} samples whose "
            f"image cannot be used:\n{lines}"
        )
        return [s for s in samples if s.sample_id not in bad]
    raise ValueError(
        f"{len(bad)} bad image(s); replace them, remove their samples from the source, or leave "
        f"them out with data.on_bad_image=skip:\n{lines}"
    )


def _normalised_points(sample: Sample) -> dict[str, tuple[float, float]]:
    """Pixel points -> fractions of the image size (read from the file header)."""
    try:
        width, height = original_size(sample.image)
    except (OSError, ValueError):
        return {}  # a missing or broken image is reported when images are read
    return {n: (x / width, y / height) for n, (x, y) in sample.points.items()}


def _maybe_unlabel(sample: Sample, fraction: float, seed: int) -> Sample:
    """Keep labels for a seeded ``fraction`` of training patients (simulates scarce labels)."""
    if sample.split != "train":
        return sample
    keep = int(rank(seed + 1, sample.patient_id)[:8], 16) / 0xFFFFFFFF < fraction
    return sample if keep else dataclasses.replace(sample, labels={}, masks={}, points={}, texts={})


class FundusDataset(Dataset):
    """Samples -> batch items. With ``teacher`` set, joins cached outputs by sample_id."""

    def __init__(
        self,
        samples: list[Sample],
        tasks: dict[str, DatasetTask],
        preprocessor: Preprocessor,
        transform: Augmentation,
        teacher: TeacherOutputs | None = None,
        view: int | None = None,
    ) -> None:
        self.samples = samples
        self.tasks = tasks
        #: how each teacher output follows the image: the tasks' and the cache's feature maps
        self.carried = {**carriers(tasks), **(teacher.carried if teacher is not None else {})}
        self.preprocessor = preprocessor
        self.transform = transform
        self.teacher = teacher
        #: fixed view index (cache writing); None samples a random cached view when views > 0
        self.view = view
        self.mask_names = sorted({m for t in tasks.values() for m in t.required_masks()})
        self.size = preprocessor.size

    def __len__(self) -> int:
        return len(self.samples)

    def _pick_view(self) -> int | None:
        views = self.teacher.views if self.teacher is not None else 0
        if self.view is not None:
            return self.view
        if views:
            return int(torch.randint(views, ()).item())
        return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        prep = self.preprocessor(sample, self.mask_names)
        view = self._pick_view()
        teacher = self.teacher.get(sample.sample_id, view or 0) if self.teacher is not None else {}
        replayed = view is not None
        if replayed:
            # Exact mode: replay the augmentation the teacher saw (or sees, when writing) in view.
            source = self.teacher.view_seed if self.teacher is not None else view_seed
            self.transform.set_random_seed(source(sample.sample_id, view))
        elif self.transform.draws:
            self.transform.follow_torch()
        moved = augment(
            self.transform, prep.image, prep.masks, prep.points, teacher, self.carried, not replayed
        )
        ann = Annotation(
            labels=sample.labels,
            masks=moved.masks,
            points=moved.points,
            size=self.size,
            texts=sample.texts,
        )
        targets, has = {}, {}
        for name, task in self.tasks.items():
            value = task.target(ann)
            has[name] = torch.tensor(value is not None)
            targets[name] = value if value is not None else task.empty_target(self.size)
        item = {
            "image": moved.image,
            "sample_id": sample.sample_id,
            "source": sample.source or "",
            "targets": targets,
            "has": has,
            "pixel_scale": torch.tensor(prep.pixel_scale, dtype=torch.float32),
        }
        if self.teacher is not None:
            item["teacher"] = {
                k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in moved.teacher.items()
            }
        return item


class FundusDataModule(L.LightningDataModule):
    """Configured sources as train/val/test (and predict = training samples for the cache)."""

    def __init__(
        self,
        data_cfg: Any,
        tasks: dict[str, DatasetTask],
        teacher: TeacherOutputs | None = None,
        run_dir: str | Path | None = None,
        predict_views: int = 0,
        scored_sources: list[str] | None = None,
        samples: SampleList | None = None,
    ) -> None:
        """``scored_sources``: validate and test on these data sources' images only (the
        splits are carved over every source as in training, so they stay the same).
        ``samples``: the run's samples when something read them before (a new list if not)."""
        super().__init__()
        self.cfg = data_cfg
        self.scored_sources = scored_sources
        self.tasks = tasks
        self.teacher = teacher
        self.run_dir = run_dir
        self.predict_views = predict_views
        self.sample_list = SampleList(data_cfg) if samples is None else samples
        self.samples: list[Sample] | None = None
        pp = data_cfg.preprocess
        self.preprocessor = Preprocessor(
            data_cfg.image_size,
            pp.fov_crop,
            pp.clahe,
            pp.local_mean,
            pp.cache_dir,
            source_sizes(data_cfg),
        )

    def prepare_data(self) -> None:
        # Runs once per node before setup: generates synthetic data if missing, writes the
        # split file and checks every image once.
        self.sample_list.prepared()

    def train_digests(self) -> dict[str, str]:
        """``SampleList.train_digests`` of this data module's samples."""
        return self.sample_list.train_digests()

    def setup(self, stage: str | None = None) -> None:
        if self.samples is None:
            # Predicting (the teacher cache) reads no label, so it checks none.
            tasks = None if stage == "predict" else self.tasks
            self.samples = load_samples(
                self.cfg, self.run_dir, tasks, self.teacher is not None, self.sample_list
            )

    def split(self, name: str) -> list[Sample]:
        self.setup()
        scored = self.scored_sources if name != "train" else None
        return [
            s for s in self.samples if s.split == name and (scored is None or s.source in scored)
        ]

    def train_transform(self) -> Augmentation:
        # Cached outputs of the unaugmented image must follow the geometry; replayed views
        # (cache.views > 0) were augmented for the teacher already, so anything goes.
        cached = self.teacher is not None and not self.teacher.views
        carried = {**carriers(self.tasks), **(self.teacher.carried if cached else {})}
        return build_transform(
            list(self.cfg.augment),
            list(self.cfg.mean),
            list(self.cfg.std),
            teacher_needs(carried) if cached else None,
        )

    def eval_transform(self) -> Augmentation:
        return build_transform([], list(self.cfg.mean), list(self.cfg.std))

    def dataset(self, split: str, train: bool = False, view: int | None = None) -> FundusDataset:
        samples = self.split(split)
        if not samples:
            only = f" from sources {self.scored_sources}" if self.scored_sources else ""
            raise ValueError(f"the configured data has no {split!r} samples{only}")
        augmented = train or view is not None
        transform = self.train_transform() if augmented else self.eval_transform()
        teacher = self.teacher if train else None
        return FundusDataset(samples, self.tasks, self.preprocessor, transform, teacher, view)

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        sampler = None
        if (
            not shuffle
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            # Evaluation must count each sample once: no padding with duplicates.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.cfg.pin_memory,
            persistent_workers=self.cfg.persistent_workers and workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train", train=True), True, self.cfg.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), False, self.cfg.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), False, self.cfg.eval_batch_size)

    def predict_dataloader(self) -> list[DataLoader] | DataLoader:
        """Training samples (labeled and unlabeled) for the teacher cache: eval transform, or
        one loader per augmented view when caching views."""
        if not self.predict_views:
            return self._loader(self.dataset("train"), False, self.cfg.eval_batch_size)
        return [
            self._loader(self.dataset("train", view=k), False, self.cfg.eval_batch_size)
            for k in range(self.predict_views)
        ]
