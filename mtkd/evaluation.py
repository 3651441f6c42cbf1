"""Evaluation the way the challenges score it: ``mtkd evaluate resolution=original joint=...``.

Validation during training and the default ``resolution=working`` score segmentation on the
FOV-cropped square at the working resolution: fast, and enough to choose checkpoints. Challenges
(IDRiD lesions, DRIVE and CHASE_DB1 vessels) score the original photograph's pixels inside its
field of view, so ``resolution=original`` maps each predicted probability map back through its
crop box onto that grid (``data_modules.preprocess.uncrop``) and scores it there, one image at a
time. Joint accuracy counts an image right only when several classification tasks are all right on
it: IDRiD's DR + DME grading score.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryJaccardIndex,
)

from data_modules.datamodule import FundusDataModule
from data_modules.io import load_image, load_mask
from data_modules.preprocess import fov_region, original_size, uncrop
from data_modules.samples import Sample
from mtkd.derived import DerivedMeasure, measure_image
from mtkd.tasks import Task
from mtkd.tasks.base import draw_counts

RESOLUTIONS = ("working", "original")
#: the mask name under which the DRIVE and CHASE_DB1 adapters give each image's field of view
FOV_MASK = "fov"
#: threshold bins of the AUPR / AUROC curves (torchmetrics ``thresholds=``)
CURVE_BINS = 200
#: the metrics a class without foreground pixels leaves undefined
CURVES = ("aupr", "auroc")
#: task groups scored jointly when ``joint=`` is not given and the checkpoint has all their tasks:
#: IDRiD's challenge grading score (Porwal et al., Med. Image Anal. 2020), both grades right
JOINT_DEFAULTS: tuple[tuple[str, ...], ...] = (("dr_grade", "dme_risk"),)


class _BinnedCurve:
    """Fills torchmetrics' ``thresholds=`` state, one 2 x 2 confusion matrix per threshold (memory
    independent of the pixel count), with one bucketize and one bincount. torchmetrics' own update
    passes over the pixels once per threshold: ~15 s per class for one 4288 x 2848 photograph at
    100 thresholds on one CPU thread."""

    thresholds: torch.Tensor
    confmat: torch.Tensor

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        above = torch.bucketize(preds, self.thresholds, right=True)  # thresholds <= p
        bins = len(self.thresholds) + 1
        counts = torch.bincount(above * 2 + target.long(), minlength=2 * bins).view(bins, 2)
        # positive at threshold i: p >= thresholds[i], i.e. above > i; columns: target 0, 1
        positive = counts.flip(0).cumsum(0).flip(0)[1:]
        total = counts.sum(0)
        self.confmat[:, 1, 1] += positive[:, 1]
        self.confmat[:, 0, 1] += positive[:, 0]
        self.confmat[:, 1, 0] += total[1] - positive[:, 1]
        self.confmat[:, 0, 0] += total[0] - positive[:, 0]


class BinnedAveragePrecision(_BinnedCurve, BinaryAveragePrecision):
    """AUPR (average precision) from binned thresholds, in bounded memory."""


class BinnedAUROC(_BinnedCurve, BinaryAUROC):
    """Pixel AUROC from binned thresholds, in bounded memory."""


class MaskScores:
    """Per class, over every pixel of every image seen (pooled, as the challenges rank): Dice and
    IoU of the mask thresholded at 0.5 (probability > 0.5, torchmetrics' rule, as in validation),
    AUPR (average precision, IDRiD's lesion ranking) and pixel AUROC. The curves use
    ``BinnedAveragePrecision`` / ``BinnedAUROC`` with ``CURVE_BINS`` thresholds, so memory does not
    grow with the images; a class without any foreground pixel has no curve (NaN). Plain names
    (``dice``) are means over the classes that have a value.

    Every metric state is a sum over pixels, so what each image adds to it is kept (a few KB):
    ``resampled_metrics`` pools a bootstrap resample of the images from those, without the
    pixels."""

    def __init__(self, classes: list[str], bins: int = CURVE_BINS) -> None:
        self.classes = classes
        self.bins = bins
        self.images = 0  # labeled images scored
        self.positives = [0] * len(classes)  # foreground pixels per class
        self.metrics = [self._metric_set() for _ in classes]
        #: per image scored (``add_image``): its sample id, foreground pixels per class and, per
        #: class, what it added to each metric's state
        self.ids: list[str] = []
        self.image_positives: list[list[int]] = []
        self.image_states: list[list[dict[str, dict[str, torch.Tensor]]]] = []

    def _metric_set(self) -> dict[str, Metric]:
        # One process scores the whole split (see ``challenge_metrics``): never sync ranks.
        common = {"validate_args": False, "sync_on_compute": False}
        return {
            "dice": BinaryF1Score(**common),
            "iou": BinaryJaccardIndex(**common),
            "aupr": BinnedAveragePrecision(thresholds=self.bins, **common),
            "auroc": BinnedAUROC(thresholds=self.bins, **common),
        }

    def _states(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        return {
            key: {name: value.clone() for name, value in metric.metric_state.items()}
            for key, metric in self.metrics[index].items()
        }

    def update(self, index: int, prob: torch.Tensor, target: torch.Tensor) -> None:
        """Class ``index``: probabilities and {0,1} labels of the same pixels, any shape."""
        self.positives[index] += int(target.sum())
        for metric in self.metrics[index].values():
            metric.update(prob.flatten(), target.flatten())

    def add_image(
        self, sample_id: str, planes: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """One image: per class, in order, the probabilities and {0,1} labels of its pixels
        (``update``), one class at a time so a plane can be freed before the next is made."""
        positives, states = [], []
        for index, (prob, target) in enumerate(planes):
            before, pixels = self._states(index), self.positives[index]
            self.update(index, prob, target)
            after = self._states(index)
            states.append(
                {k: {n: after[k][n] - v for n, v in part.items()} for k, part in before.items()}
            )
            positives.append(self.positives[index] - pixels)
        self.images += 1
        self.ids.append(sample_id)
        self.image_positives.append(positives)
        self.image_states.append(states)

    def compute(self) -> dict[str, float]:
        return _pooled_scores(self.classes, self.metrics, self.positives)

    def merge(self, other: MaskScores) -> None:
        """Add the images ``other`` scored (another rank's share of the split)."""
        for mine, theirs in zip(self.metrics, other.metrics):
            for key, metric in mine.items():
                metric.merge_state(theirs[key])
        self.images += other.images
        self.positives = [a + b for a, b in zip(self.positives, other.positives)]
        self.ids += other.ids
        self.image_positives += other.image_positives
        self.image_states += other.image_states

    def resampled_metrics(self, draws: torch.Tensor) -> dict[str, torch.Tensor]:
        """``compute``'s keys -> their value on each resample of the scored images (``draws``:
        R x N indices into them in sample-id order, as ``collect_outputs`` orders a task's
        images): a resample's states are sums of its images' states, each torchmetrics metric
        computes from them as from its own updates."""
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)
        counts = draw_counts(draws, len(order))  # R x N
        per_image = torch.tensor([self.image_positives[i] for i in order], dtype=torch.float64)
        positives = (counts @ per_image).tolist()  # R x C
        summed = [
            {
                key: {
                    name: torch.einsum(
                        "rn,n...->r...",
                        counts,
                        torch.stack([self.image_states[i][c][key][name] for i in order]).double(),
                    )
                    .round()
                    .long()
                    for name in self.image_states[0][c][key]
                }
                for key in self.image_states[0][c]
            }
            for c in range(len(self.classes))
        ]
        scratch = [self._metric_set() for _ in self.classes]
        rows = []
        with warnings.catch_warnings():
            # merge_state fills a reset metric's state without update(), which torchmetrics notes.
            warnings.filterwarnings("ignore", message=r".*was called before the ``update``")
            for r in range(len(draws)):
                for metrics, states in zip(scratch, summed):
                    for key, metric in metrics.items():
                        metric.reset()
                        metric.merge_state({n: v[r] for n, v in states[key].items()})
                rows.append(_pooled_scores(self.classes, scratch, positives[r]))
        return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def _pooled_scores(
    classes: list[str], metrics: list[dict[str, Metric]], positives: list[float]
) -> dict[str, float]:
    """``MaskScores``' values from its per-class metrics and foreground pixel counts."""
    out = {}
    for name, class_metrics, count in zip(classes, metrics, positives):
        for key, metric in class_metrics.items():
            undefined = key in CURVES and not count
            out[f"{key}_{name}"] = math.nan if undefined else float(metric.compute())
    for key in metrics[0]:
        values = [v for c in classes if not math.isnan(v := out[f"{key}_{c}"])]
        out[key] = sum(values) / len(values) if values else math.nan
    return out


def original_masks(sample: Sample, classes: list[str]) -> np.ndarray | None:
    """C x H x W {0,1} label masks at the original resolution. As ``SegmentationTask.target``
    reads them: an absent class is empty, a sample with none of the classes is unlabeled (None)."""
    if not any(c in sample.masks for c in classes):
        return None
    width, height = original_size(sample.image)
    empty = np.zeros((height, width), np.uint8)
    return np.stack([load_mask(sample.masks[c]) if c in sample.masks else empty for c in classes])


def field_of_view(sample: Sample) -> np.ndarray:
    """H x W bool: the dataset's FOV mask when it ships one (DRIVE, CHASE_DB1), else the bright
    region of the photograph (the rule ``fov_box`` crops around)."""
    if FOV_MASK in sample.masks:
        return load_mask(sample.masks[FOV_MASK]).astype(bool)
    return fov_region(load_image(sample.image))


def score_original(
    scores: MaskScores, prob: np.ndarray, sample: Sample, box: tuple[int, int, int, int]
) -> None:
    """Map one sample's C x s x s probabilities back through its crop ``box`` onto the original
    grid and score the pixels inside the field of view; one class at a time, so a 4288 x 2848
    photograph needs ~50 MB per map. Unlabeled samples are skipped."""
    target = original_masks(sample, scores.classes)
    if target is None:
        return
    fov = field_of_view(sample)
    height, width = fov.shape
    planes = (
        (
            torch.from_numpy(uncrop(plane[None], box, width, height)[0][fov]),
            torch.from_numpy(t[fov]),
        )
        for plane, t in zip(prob, target)
    )
    scores.add_image(sample.sample_id, planes)


def joint_groups(tasks: dict[str, Task], requested: list[str] | None) -> list[tuple[str, ...]]:
    """The task groups to score jointly: one per ``joint=a,b`` argument; ``joint=none`` for none;
    without the argument, each of ``JOINT_DEFAULTS`` whose tasks the checkpoint has."""
    names = [n for n, t in tasks.items() if t.single_class]
    if requested is None:
        return [g for g in JOINT_DEFAULTS if set(g) <= set(names)]
    if requested == ["none"]:
        return []
    groups = []
    for item in requested:
        group = tuple(n for n in item.split(",") if n)
        if len(set(group)) < 2 or not set(group) <= set(names):
            raise ValueError(
                f"joint={item}: name two or more of the checkpoint's classification tasks, "
                f"comma-separated ({', '.join(names) or 'it has none'}), or joint=none"
            )
        groups.append(group)
    return groups


class SplitRecorder(Callback):
    """What ``mtkd evaluate`` scores beyond the module's own metrics, recorded in the same
    Lightning pass over the split (``evaluate`` makes one pass, not three): every task's outputs
    per labeled image (``keep_outputs``: for joint accuracy and the bootstrap intervals) and, with
    ``resolution="original"``, each segmentation image scored on its original pixels, and the
    ``derived`` measures of every image (``mtkd.derived``), scored against their labels. Under
    DDP each rank records its share of the split and rank 0 gathers them, so each sample counts
    once."""

    def __init__(
        self,
        tasks: dict[str, Task],
        dm: FundusDataModule,
        split: str,
        resolution: str,
        keep_outputs: bool,
        derived: dict[str, DerivedMeasure] | None = None,
    ) -> None:
        self.tasks = tasks
        self.dm = dm
        self.split = split
        self.keep_outputs = keep_outputs
        self.rows: list[dict[str, tuple]] = []
        self.derived = derived or {}
        #: per image of the split: its id and each derived measure's value
        self.measured: list[tuple[str, dict[str, float]]] = []
        self.scores = {
            n: MaskScores(t.required_masks())
            for n, t in tasks.items()
            if resolution == "original" and t.dense and t.required_masks()
        }
        #: the split's samples by id and the masks its items read (its preprocessing cache key)
        self.samples: dict[str, Sample] = {}
        self.mask_names: list[str] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.record(outputs, batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self.record(outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.gather()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.gather()

    def record(self, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        """One batch: the step's network ``outputs`` and the batch it ran on."""
        outputs = {k: v.detach().float().cpu() for k, v in outputs.items()}
        batch = {**batch, "has": {k: v.cpu() for k, v in batch["has"].items()}}
        batch["targets"] = {k: v.cpu() for k, v in batch["targets"].items()}
        batch["pixel_scale"] = batch["pixel_scale"].cpu()
        if self.keep_outputs:
            self.rows.append(batch_rows(outputs, batch, list(self.tasks)))
        if (self.scores or self.derived) and not self.samples:
            dataset = self.dm.dataset(self.split)
            self.samples = {s.sample_id: s for s in dataset.samples}
            self.mask_names = dataset.mask_names
        if self.derived:
            used = set().union(*(d.tasks for d in self.derived.values()))
            values = {n: self.tasks[n].activate(outputs[n]) for n in used}
            for row, sample_id in enumerate(batch["sample_id"]):
                image = {n: v[row] for n, v in values.items()}
                self.measured.append((sample_id, measure_image(self.tasks, self.derived, image)))
        for name, task_scores in self.scores.items():
            probs = self.tasks[name].activate(outputs[name]).numpy()
            for prob, sample_id, has in zip(probs, batch["sample_id"], batch["has"][name]):
                if has:
                    sample = self.samples[sample_id]
                    box = self.dm.preprocessor(sample, self.mask_names).box
                    score_original(task_scores, prob, sample, box)

    def gather(self) -> None:
        """Rank 0 takes every rank's records (nothing to do in one process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (self.rows, self.scores, self.measured))
        if dist.get_rank() != 0:
            return
        self.rows = [r for rows, _, _ in shares for r in rows]
        self.measured = [m for _, _, measured in shares for m in measured]
        first, *others = [scores for _, scores, _ in shares]
        for scores in others:
            for name, task_scores in scores.items():
                first[name].merge(task_scores)
        self.scores = first

    def results(
        self, split: str, joint: list[tuple[str, ...]], resamples: int
    ) -> tuple[dict[str, float], dict[str, list[float]] | None]:
        """``<split>/<task>/<metric>`` for every task rescored at the original resolution and
        ``<split>/<a>+<b>/joint_acc`` per joint group; and with ``resamples`` > 0 the 95 %
        percentile bootstrap interval of every metric over the split's labeled images (a
        rescored task's at that resolution, from the same draws of its images), else None.
        Each derived measure with a label: ``<split>/derived/<name>/mae`` and ``r2`` over the
        images that carry the label."""
        outputs = assemble(self.rows)
        derived = self.derived_outputs()
        rescored = {n: task_scores for n, task_scores in self.scores.items() if task_scores.images}
        metrics = {
            f"{split}/{name}/{key}": value
            for name, task_scores in rescored.items()
            for key, value in task_scores.compute().items()
        }
        for group in joint:
            right = joint_outputs(self.tasks, outputs, group)
            if right is not None:
                metrics[f"{split}/{'+'.join(group)}/joint_acc"] = float(right.pred.mean())
        for name, out in derived.items():
            found = value_scores(out.pred[None], out.target[None])
            metrics.update({f"{split}/derived/{name}/{k}": float(v) for k, v in found.items()})
        if not resamples:
            return metrics, None
        working = {name: out for name, out in outputs.items() if name not in rescored}
        values = resampled_values(self.tasks, working, joint, resamples)
        for name, task_scores in rescored.items():
            draws = resample_draws(len(task_scores.ids), resamples)
            values.update(
                {f"{name}/{k}": v for k, v in task_scores.resampled_metrics(draws).items()}
            )
        for name, out in derived.items():
            draws = resample_draws(len(out.ids), resamples)
            found = value_scores(out.pred[draws], out.target[draws])
            values.update({f"derived/{name}/{k}": v for k, v in found.items()})
        return metrics, {f"{split}/{key}": ci for key, ci in intervals(values).items()}

    def derived_outputs(self) -> dict[str, TaskOutputs]:
        """Per derived measure with a label: its value and the label on each image that carries
        the label (a finite number), in sample-id order; measures no image is labeled for are
        left out."""
        found = {}
        for name, entry in self.derived.items():
            pairs = sorted(
                (sample_id, values[name], self.samples[sample_id].labels.get(entry.label))
                for sample_id, values in self.measured
            )
            pairs = [p for p in pairs if p[2] is not None and math.isfinite(p[2])]
            if pairs:
                ids, pred, target = zip(*pairs)
                found[name] = TaskOutputs(
                    list(ids), torch.tensor(pred).double(), torch.tensor(target).double(), {}
                )
        return found


def value_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """MAE and R² (1 - SS_res / SS_tot, NaN when the targets do not vary) of each row of paired
    values: a row per bootstrap resample, or one row for the whole split."""
    error = pred - target
    spread = ((target - target.mean(dim=-1, keepdim=True)) ** 2).sum(dim=-1)
    r2 = 1 - (error**2).sum(dim=-1) / spread
    return {"mae": error.abs().mean(dim=-1), "r2": torch.where(spread > 0, r2, math.nan)}


# -- bootstrap intervals over test images ----------------------------------------------------------

#: resamples behind each interval (``mtkd evaluate bootstrap=N``; 0 turns the intervals off)
BOOTSTRAP_RESAMPLES = 1000
#: fixed, so a rerun and the report draw the same resamples
BOOTSTRAP_SEED = 0
#: two-sided coverage of the percentile intervals
LEVEL = 0.95


@dataclass
class TaskOutputs:
    """One task's raw outputs and targets on the samples labeled for it, in sample-id order (so
    two models' outputs on one split pair row by row)."""

    ids: list[str]
    pred: torch.Tensor
    target: torch.Tensor
    extras: dict[str, torch.Tensor]


def batch_rows(
    outputs: dict[str, torch.Tensor], batch: dict, names: list[str]
) -> dict[str, tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per task, the batch's labeled images: their ids, outputs, targets and pixel scales."""
    rows = {}
    for name in names:
        has = batch["has"][name]
        ids = [i for i, keep in zip(batch["sample_id"], has) if keep]
        rows[name] = (ids, outputs[name].float().cpu()[has], batch["targets"][name][has])
        rows[name] += (batch["pixel_scale"][has],)
    return rows


def assemble(batches: list[dict[str, tuple]]) -> dict[str, TaskOutputs]:
    """``batch_rows`` of every batch -> each task's ``TaskOutputs`` in sample-id order (tasks
    labeled on no image left out)."""
    collected = {}
    for name in batches[0] if batches else []:
        rows = [b[name] for b in batches]
        ids = [i for r in rows for i in r[0]]
        if not ids:
            continue
        order = sorted(range(len(ids)), key=ids.__getitem__)
        pred, target, scale = (torch.cat([r[k] for r in rows])[order] for k in (1, 2, 3))
        collected[name] = TaskOutputs([ids[i] for i in order], pred, target, {"pixel_scale": scale})
    return collected


@torch.inference_mode()
def collect_outputs(
    net: torch.nn.Module, dm: FundusDataModule, split: str, device: torch.device
) -> dict[str, TaskOutputs]:
    """Every task's outputs on ``split`` (``net(image)`` -> raw outputs per task), kept per
    sample for resampling, in one pass in this process (``report`` pairs two models with it)."""
    net.to(device).eval()
    dataset = dm.dataset(split)
    loader = DataLoader(dataset, batch_size=dm.cfg.eval_batch_size, num_workers=dm.cfg.num_workers)
    names = list(dm.tasks)
    return assemble([batch_rows(net(b["image"].to(device)), b, names) for b in loader])


def resample_draws(n: int, resamples: int, seed: int = BOOTSTRAP_SEED) -> torch.Tensor:
    """``resamples`` x ``n`` indices drawn with replacement; the same (n, seed) gives the same
    draws, which is what pairs two models on one split."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=generator)


def percentile_interval(values: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval (linear interpolation between order
    statistics); resamples on which a metric is undefined (NaN) are left out."""
    tail = (1 - level) / 2
    lo, hi = torch.nanquantile(values.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(lo), float(hi)


def joint_outputs(
    tasks: dict[str, Task], outputs: dict[str, TaskOutputs], group: tuple[str, ...]
) -> TaskOutputs | None:
    """Per image labeled for every task of ``group``: 1 when every task's predicted class is
    right (the samples ``JointAccuracy`` counts), as a one-column TaskOutputs."""
    if not all(n in outputs for n in group):
        return None
    ids = sorted(set.intersection(*(set(outputs[n].ids) for n in group)))
    if not ids:
        return None
    right = torch.ones(len(ids), dtype=torch.bool)
    for name in group:
        out = outputs[name]
        position = {sample_id: row for row, sample_id in enumerate(out.ids)}
        rows = torch.tensor([position[i] for i in ids])
        right &= tasks[name].predicted_class(out.pred[rows]) == out.target[rows]
    return TaskOutputs(ids, right.double(), right.double(), {})


def resampled_values(
    tasks: dict[str, Task],
    outputs: dict[str, TaskOutputs],
    joint: list[tuple[str, ...]],
    resamples: int,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, torch.Tensor]:
    """``<task>/<metric>`` (and ``<a>+<b>/joint_acc``) -> its value on each of ``resamples``
    resamples of the labeled images (seeded by ``seed`` and the image count)."""
    values = {}
    for name, out in outputs.items():
        draws = resample_draws(len(out.ids), resamples, seed)
        found = tasks[name].resampled_metrics(out.pred, out.target, out.extras, draws)
        values.update({f"{name}/{k}": v for k, v in found.items()})
    for group in joint:
        out = joint_outputs(tasks, outputs, group)
        if out is not None:
            draws = resample_draws(len(out.ids), resamples, seed)
            values[f"{'+'.join(group)}/joint_acc"] = out.pred[draws].mean(dim=1)
    return values


def intervals(values: dict[str, torch.Tensor], level: float = LEVEL) -> dict[str, list[float]]:
    """``[lo, hi]`` per metric from its resampled values."""
    return {key: list(percentile_interval(v, level)) for key, v in values.items()}


def paired_differences(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], level: float = LEVEL
) -> dict[str, dict[str, float | bool]]:
    """A − B per metric both have, resample by resample (the same draws of the same images):
    the interval of the difference and whether it excludes 0 (``significant``)."""
    out = {}
    for key in sorted(set(a) & set(b)):
        lo, hi = percentile_interval(a[key] - b[key], level)
        out[key] = {"lo": lo, "hi": hi, "significant": not lo <= 0 <= hi}
    return out


def check_paired(a: dict[str, TaskOutputs], b: dict[str, TaskOutputs], what: str) -> None:
    """Two models pair only on the same labeled images per task."""
    for name in set(a) & set(b):
        if a[name].ids != b[name].ids:
            raise ValueError(
                f"{what}: task {name!r} is labeled on different test images for the two models "
                "(different data configs); evaluate both on the same data to compare them"
            )
