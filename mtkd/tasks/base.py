"""The task registry and the contract every task kind fulfils.

A task kind is one class registered by name. It owns everything kind-specific: its head, how it
reads its target from an annotated sample, its supervised loss and default KD loss (the registry
of ``mtkd.kd.losses``), its metrics, how its teacher output is stored in the cache, and how
its output is read by a person (channel names, predict's summary, overlays, W&B captions) or by a
deployed model (``activation``). Nothing outside ``mtkd/tasks`` names a task kind.
"""

from __future__ import annotations

import abc
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from data_modules.contract import Annotation
from data_modules.registry import Registry
from mtkd.kd.losses import TaskKD, kd_loss_function
from mtkd.kd.storage import CacheStorage

TASK_KINDS: Registry[type[Task]] = Registry("tasks.<t>.kind", "task kind", "@register_task(kind)")


@dataclass
class TaskSpec:
    """Fields every task accepts; kinds extend this with their own."""

    kind: str
    weight: float = 1.0
    #: fields that change neither the head's parameters nor a teacher's cached outputs (the
    #: training loss, what is scored, how a text is decoded): left out of the task's identity,
    #: so changing them reuses teacher caches and checkpoints
    loss_only: ClassVar[tuple[str, ...]] = ("weight",)


@dataclass
class Overlay:
    """What a task draws over one image: boolean masks (name -> H x W) and normalised points
    (name -> (x, y) in [0, 1]^2, pixel-centre convention)."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    points: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Frame:
    """Where the network's input lies in the original photograph, for reading a prediction in
    its pixels: the crop box origin (x0, y0) and side (width, height) in original pixels, and the
    field-of-view mask (H x W bool) of the network input."""

    origin: tuple[float, float]
    scale: tuple[float, float]
    fov: torch.Tensor


def register_task(kind: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make ``kind`` usable in ``tasks:`` YAML entries."""

    def decorate(cls: type[Task]) -> type[Task]:
        if cls.activation not in ACTIVATIONS:
            raise ValueError(
                f"task kind {kind!r}: activation={cls.activation!r} is not one of "
                f"{sorted(ACTIVATIONS)}"
            )
        TASK_KINDS.register(kind, cls)
        cls.kind = kind
        return cls

    return decorate


def task_kinds() -> list[str]:
    return TASK_KINDS.names()


def parse_spec(spec_cls: type, name: str, raw: dict[str, Any]) -> Any:
    """Build a spec dataclass from YAML, rejecting unknown keys with the valid ones listed."""
    valid = {f.name for f in dataclasses.fields(spec_cls)}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ValueError(
            f"task {name!r} ({raw.get('kind')}): unknown keys {unknown}; valid keys: {sorted(valid)}"
        )
    try:
        return spec_cls(**raw)
    except TypeError as exc:
        raise ValueError(f"task {name!r}: {exc}") from None


class Task(abc.ABC):
    """One prediction target of the multi-task network."""

    kind: ClassVar[str]
    spec_class: ClassVar[type] = TaskSpec
    #: "global" heads read pooled encoder features; "dense" heads read the decoder output.
    dense: ClassVar[bool] = False
    #: How a cached teacher output follows geometric augmentation: "none", "mask" or "points".
    teacher_spatial: ClassVar[str] = "none"
    default_temperature: ClassVar[float] = 1.0
    #: The metric that summarises this task: a key of ``metrics()``, or its loss. Its direction
    #: is the metric's own (``higher_is_better``), never written here.
    main_metric: ClassVar[str] = "loss"
    #: How the raw output becomes probabilities: "softmax", "sigmoid" or "none" (export metadata).
    activation: ClassVar[str] = "none"
    #: Whether each output names one class (``predicted_class``), so that several such tasks can
    #: be scored jointly (IDRiD's DR + DME grading: both right on the same image) and get a
    #: confusion matrix in W&B.
    single_class: ClassVar[bool] = False
    #: The registered KD loss (``mtkd.kd.losses``) used unless ``kd.tasks.<task>.loss``
    #: names another; None: the kind has no KD loss (``kd_loss`` then says how to add one).
    default_kd_loss: ClassVar[str | None] = None

    def __init__(self, name: str, raw_spec: dict[str, Any]) -> None:
        self.name = name
        self.spec = parse_spec(self.spec_class, name, raw_spec)
        self.validate()
        #: this task's KD options (``kd.tasks.<task>``), set by ``configure_kd``
        self.kd = TaskKD()

    def validate(self) -> None:  # noqa: B027  (optional hook)
        """Raise ValueError for an inconsistent spec."""

    @property
    def weight(self) -> float:
        return float(self.spec.weight)

    @property
    @abc.abstractmethod
    def out_channels(self) -> int:
        """Number of head outputs (channels for dense tasks)."""

    @abc.abstractmethod
    def build_head(self, in_channels: int) -> nn.Module:
        """The head, fed pooled encoder features (global) or decoder features (dense)."""

    # -- targets ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def target(self, ann: Annotation) -> torch.Tensor | None:
        """This task's target for one sample, or None when the sample has no label for it."""

    @abc.abstractmethod
    def empty_target(self, size: int) -> torch.Tensor:
        """Placeholder of the target's shape for samples without a label (masked out)."""

    def guide(self, target: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor | None:
        """What the head reads besides the pooled features in training and evaluation (a
        sequence head's teacher forcing: the reference tokens, and the teacher's when the batch
        has a teacher output): the head is then called ``head(features, guide)``. None (the
        default): the head reads the features alone, as it does in predict and export."""
        return None

    @property
    def learns_from_data(self) -> bool:
        """Whether the spec leaves open what ``learned_spec`` fixes from the training data."""
        return False

    def learned_spec(self, train: list[Any]) -> dict[str, Any]:
        """Spec fields fixed from the training samples (``data_modules`` Sample records) before
        any network is built, e.g. a text task's vocabulary. A new run's config takes them
        (``mtkd.run_config.load_config``), so the checkpoint saves them and ``identity``, which
        a teacher cache is checked against, names them. Nothing by default."""
        return {}

    def required_masks(self) -> list[str]:
        """Mask names the loader must read for this task (``label_problems`` checks them)."""
        return []

    def required_points(self) -> list[str]:
        """Point names this task reads (``label_problems`` checks they lie in the image)."""
        return []

    # -- losses (per-sample vectors, fp32) ------------------------------------------------------
    @abc.abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Supervised loss per sample, shape [B]."""

    def configure_kd(self, options: TaskKD) -> None:
        """Take this task's ``kd.tasks.<task>`` entry; an unknown loss fails here, at start-up,
        with the kind's registered losses listed."""
        self.kd = options
        if self.kd_loss_name is not None:
            kd_loss_function(self.name, self.kind, self.kd_loss_name)

    @property
    def kd_loss_name(self) -> str | None:
        """The KD loss in use: ``kd.tasks.<task>.loss``, else the kind's default."""
        return self.kd.loss or self.default_kd_loss

    def kd_loss(
        self, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Distillation loss per sample against the teacher's (cached) output, shape [B]: the
        registered loss ``kd_loss_name``."""
        loss = kd_loss_function(self.name, self.kind, self.kd_loss_name)
        return loss(self, pred, teacher, temperature)

    # -- readable outputs ----------------------------------------------------------------------
    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw head output -> what a person reads: probabilities, values or points."""
        return ACTIVATIONS[self.activation](raw.float())

    def predicted_class(self, raw: torch.Tensor) -> torch.Tensor:
        """The class index per sample, for ``single_class`` tasks."""
        return raw.argmax(dim=1)

    def exported(self, raw: torch.Tensor) -> torch.Tensor:
        """What the exported (ONNX) network outputs for this task: the raw head output, which
        ``activation`` turns into probabilities."""
        return raw

    def channel_names(self) -> list[str]:
        """Names of the outputs (classes, labels or points), for predict, export and panels;
        indices by default."""
        return [str(i) for i in range(self.out_channels)]

    def summarise(self, value: torch.Tensor, frame: Frame) -> dict[str, Any]:
        """One image's activated output as JSON-ready, readable values (``mtkd predict``); by
        default each channel's value."""
        return {"values": dict(zip(self.channel_names(), value.tolist()))}

    def summary_line(self, summary: dict[str, Any]) -> str:
        """``summarise``'s output as one line of predict's table."""
        return "  ".join(f"{k}={v:.3f}" for k, v in summary["values"].items())

    def overlay(self, value: torch.Tensor) -> Overlay:
        """One sample's activated output, or its target, drawn over the image (predict's and
        the report's overlays, the W&B panel); nothing by default. Called on ``empty_target``
        too, to name the layers before any prediction (legend colours)."""
        return Overlay()

    def caption(self, value: torch.Tensor, target: torch.Tensor | None) -> str:
        """What the W&B panel writes for this task under an image (activated output, target or
        None when unlabeled); empty for a task ``overlay`` draws."""
        drawn = self.overlay(value)
        if drawn.masks or drawn.points:
            return ""
        names = self.channel_names()
        shown = " ".join(f"{n}={v:.2f}" for n, v in zip(names, value.flatten().tolist()))
        truth = "?" if target is None else " ".join(f"{v:g}" for v in target.flatten().tolist())
        return f"{shown} (true {truth})"

    # -- teacher outputs and the cache -----------------------------------------------------------
    def teacher_output(self, pred: torch.Tensor) -> torch.Tensor:
        """What the teacher passes to the student (logits by default)."""
        return pred.float()

    def teacher_at(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The teacher output for an image of ``size`` (H, W): unchanged by default (logits,
        values and normalised points do not depend on the image size); maps override it."""
        return output

    def combine_teachers(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Ensemble several teachers' ``teacher_output``s into one (mean by default)."""
        return torch.stack(outputs).mean(dim=0)

    def cache_shape(self, storage: CacheStorage) -> tuple[int, ...]:
        return (self.out_channels,)

    def cache_dtype(self, storage: CacheStorage) -> np.dtype:
        return np.dtype(storage.logits_dtype)

    def encode_cache(self, output: torch.Tensor, storage: CacheStorage) -> np.ndarray:
        """Teacher outputs [B, ...] -> array rows for the cache."""
        return output.detach().float().cpu().numpy().astype(self.cache_dtype(storage))

    def decode_cache(self, row: np.ndarray) -> np.ndarray:
        """One cache row -> float32 array (dense maps stay at cache resolution here); a copy,
        so the read-only memory map is never handed to torch."""
        return np.array(row, dtype=np.float32)

    # -- metrics -------------------------------------------------------------------------------
    @abc.abstractmethod
    def metrics(self) -> MetricCollection:
        """A fresh torchmetrics collection for one stage."""

    def update_metrics(
        self, metrics: MetricCollection, pred: torch.Tensor, target: torch.Tensor, batch: dict
    ) -> None:
        metrics.update(pred.float(), target)

    def health_metrics(self) -> MetricCollection | None:
        """Validation-only metrics that ``stuck_hint`` reads and nobody logs (the classes a
        global head predicts, a dense head's highest probability and pixel ranking)."""
        return None

    def higher_is_better(self, metric: str | None = None) -> bool:
        """Whether a higher ``metric`` (default: the main one) is better: the torchmetrics
        metric's own ``higher_is_better``, the one owner of a direction (report, study, score and
        the checkpoint monitor read it here); a loss, no torchmetrics metric, is better lower.
        Raises LookupError for a metric the task lacks or one that declares no direction."""
        metric = metric or self.main_metric
        if metric == "loss":
            return False
        metrics = self.metrics()
        higher = metrics[metric].higher_is_better if metric in metrics else None
        if higher is None:
            raise LookupError(
                f"task kind {self.kind!r} has no metric {metric!r} with a direction "
                f"(higher_is_better); its metrics: {list(metrics)}"
            )
        return higher

    def score(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The main metric (``main_metric``) of ``values`` on one scale for every kind: in [0, 1],
        higher is better, 0 at chance or worse where the kind knows chance, so ``val/score`` (the
        default checkpoint monitor) can average tasks of different units and notices a head that
        never leaves its prior, which a summed loss hides. This default takes a higher-is-better
        metric clipped to [0, 1] and maps a lower-is-better one through 1 / (1 + value)."""
        value = values[self.main_metric].float().nan_to_num(0.0)
        return value.clamp(0, 1) if self.higher_is_better() else 1 / (1 + value.clamp(min=0))

    def stuck_hint(self, values: dict[str, torch.Tensor]) -> str | None:
        """Why this head looks stuck, from its validation ``values`` (its metrics and health
        metrics), with what to try; None while it learns. Asked once, after a quarter of the
        epochs (``MultiTaskModule``), so a stuck head is named while the run can be stopped."""
        return None

    def describe(self) -> dict[str, Any]:
        """The spec as a plain dict (for checkpoints and exports)."""
        return dataclasses.asdict(self.spec)

    def identity(self) -> dict[str, Any]:
        """What fixes the task's outputs: the spec without its ``loss_only`` fields (a task-weight
        or loss sweep must reuse the same teacher cache and checkpoints)."""
        return {k: v for k, v in self.describe().items() if k not in self.spec.loss_only}

    def label_problems(
        self, labels: dict[str, float], masks: set[str], points: dict[str, tuple[float, float]]
    ) -> list[str] | None:
        """One sample's raw labels, checked once when the data is loaded (a bad value must not
        surface mid-epoch or as a NaN metric): None when the sample carries no label for this
        task, else its problems (empty: fine). ``masks`` are the mask names the sample has;
        ``points`` are normalised to the image ((0, 0) to (1, 1)). This default checks points
        and masks; kinds that read ``labels`` override it."""
        have = [n for n in self.required_points() if n in points]
        if have:
            return [
                f"point {n}={points[n]} (normalised) lies outside the image"
                for n in have
                if not all(0 <= v <= 1 for v in points[n])
            ]
        if self.required_points():
            return None
        if self.required_masks():
            return [] if masks & set(self.required_masks()) else None
        return []

    def sample_problems(
        self,
        labels: dict[str, float],
        masks: set[str],
        points: dict[str, tuple[float, float]],
        texts: dict[str, str],
    ) -> list[str] | None:
        """``label_problems`` given the sample's ``texts`` too: what the data check calls. Kinds
        that read texts override it; ``label_problems`` keeps its three arguments, so kinds
        written against it (plugins) keep working."""
        return self.label_problems(labels, masks, points)

    def resampled_metrics(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        extras: dict[str, torch.Tensor],
        draws: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Every metric of ``metrics()`` on each bootstrap resample of the labeled samples:
        ``pred`` / ``target`` / ``extras`` (e.g. ``pixel_scale``) hold one row per sample,
        ``draws`` is R x N sample indices; returns R values per metric. This default reruns the
        task's own metrics on every resample, so the intervals measure exactly what validation
        reports (about 1.5 ms per resample for a classification task on 90 images); classification,
        segmentation and localization override it with per-sample statistics summed by
        ``draw_counts``, equal to it on every resample (test_bootstrap)."""
        metrics = self.metrics()
        for metric in metrics.values():
            # One process resamples the whole split (under DDP, rank 0 alone): never sync ranks.
            metric.distributed_available_fn = lambda: False
        values: dict[str, list[torch.Tensor]] = {}
        with warnings.catch_warnings():
            # A resample can miss a class; torchmetrics warns as it would on such a split.
            warnings.simplefilter("ignore")
            for rows in draws:
                metrics.reset()
                self.update_metrics(
                    metrics, pred[rows], target[rows], {k: v[rows] for k, v in extras.items()}
                )
                for key, value in metrics.compute().items():
                    values.setdefault(key, []).append(value.detach().double().cpu())
        return {key: torch.stack(v) for key, v in values.items()}


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda x: x.softmax(dim=1),
    "sigmoid": torch.sigmoid,
    "none": lambda x: x,
}


def draw_counts(draws: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of ``n`` samples is drawn in each resample of ``draws`` (R x N indices),
    as R x N float64: a resample's sum of any per-sample statistic is then one matrix product,
    which is how kinds score 1000 resamples without rerunning their metrics 1000 times."""
    counts = torch.zeros(len(draws), n, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones(draws.shape, dtype=torch.float64))


def masked_mean(values: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Mean over the samples that carry a label; exactly 0 (with a graph) when none does."""
    has = has.to(values.dtype)
    return (values * has).sum() / has.sum().clamp(min=1.0)


def resize(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a B x C x H x W batch, antialiased when shrinking like the
    preprocessing's own resize (images fed to a teacher at its size, teacher maps brought back);
    a no-op at the same size."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)


def elementwise_loss(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample mean of squared ("mse") or absolute ("l1") differences over all but dim 0."""
    diff = (a - b).flatten(1)
    return (diff**2 if kind == "mse" else diff.abs()).mean(dim=1)


def global_head(in_channels: int, out_channels: int) -> nn.Module:
    """Pooled image features (batch, in_channels) -> linear outputs (every global task kind; the
    dropout before it is the network's ``model.head_dropout``). The Identity keeps the linear
    layer at index 1, so checkpoints keep their parameter names (``heads.<task>.1.weight``)."""
    return nn.Sequential(nn.Identity(), nn.Linear(in_channels, out_channels))
