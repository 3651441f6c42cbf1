"""Dense segmentation with one sigmoid channel per class (lesions, vessels, disc, cup)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import ClasswiseWrapper, Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryF1Score,
    BinaryJaccardIndex,
    MultilabelAUROC,
    MultilabelF1Score,
    MultilabelJaccardIndex,
)
from torchmetrics.wrappers.abstract import WrapperMetric

from mtkd.kd.losses import register_kd_loss
from mtkd.kd.storage import CacheStorage
from mtkd.tasks.base import (
    Annotation,
    Frame,
    Overlay,
    Task,
    TaskSpec,
    draw_counts,
    register_task,
    resize,
)

_EPS = 1e-4
#: a pixel belongs to a class when its sigmoid probability reaches this (predict, overlays)
MASK_THRESHOLD = 0.5


#: a class whose pixels rank this well is learning, even with every probability below 0.5
STUCK_AUROC = 0.75


#: about this many pixels per image feed the stuck check's pixel AUROC (a strided grid): its
#: binned update costs pixels x thresholds, ~1 s per validation batch of 32 at 96 px on all of them
HEALTH_PIXELS = 1024


class OnPixelGrid(WrapperMetric):
    """``metric`` on a strided grid of each image's pixels, about ``HEALTH_PIXELS`` of them: a
    diagnostic of the ranking does not need every pixel."""

    def __init__(self, metric: Metric) -> None:
        super().__init__()
        self.metric = metric

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        step = max(1, math.isqrt(preds.shape[-2] * preds.shape[-1] // HEALTH_PIXELS))
        self.metric.update(preds[..., ::step, ::step], target[..., ::step, ::step])

    def compute(self) -> torch.Tensor:
        return self.metric.compute()

    def reset(self) -> None:
        self.metric.reset()
        super().reset()


class ChannelMax(Metric):
    """The highest probability each channel reaches over every pixel of every image."""

    full_state_update = False

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.add_state("value", torch.full((channels,), -torch.inf), dist_reduce_fx="max")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.value = torch.maximum(self.value, preds.transpose(0, 1).flatten(1).amax(dim=1))

    def compute(self) -> torch.Tensor:
        return self.value


def _dice_terms(
    prob: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft Dice's numerator and denominator per sample and class, and each class's weight in
    the sample's mean (1 / the number of classes the target shows, 0 for the others): one pass
    over the pixels each, shared by ``_dice_loss`` and the fused KD loss's own gradient."""
    prob, target = prob.flatten(2), target.flatten(2)
    num = 2 * torch.linalg.vecdot(prob, target) + 1.0
    den = prob.sum(-1) + target.sum(-1) + 1.0
    shown = (target.amax(-1) > 0.5).to(num.dtype)
    return num, den, shown / shown.sum(dim=1, keepdim=True).clamp(min=1.0)


def _dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per sample, averaged over the classes the target shows (some pixel above
    0.5; 0 when none does). On an empty mask soft Dice rewards predicting nothing at all; with
    small lesions absent from half the images that reward won (the synthetic teacher predicted
    no lesion anywhere). BCE / KL still penalise false positives there."""
    num, den, weight = _dice_terms(prob, target)
    return ((1.0 - num / den) * weight).sum(dim=1)


@dataclass
class SegmentationSpec(TaskSpec):
    classes: list[str] = field(default_factory=list)
    #: weight of the soft Dice term added to pixel-wise BCE
    dice_weight: float = 1.0
    #: BCE weight of foreground pixels, one per class (null: 1 for all): > 1 for structures of a
    #: few pixels (lesions), whose rare foreground otherwise leaves every probability near 0
    pos_weight: list[float] | None = None
    loss_only: ClassVar[tuple[str, ...]] = (*TaskSpec.loss_only, "dice_weight", "pos_weight")


@register_task("segmentation")
class SegmentationTask(Task):
    """A sample is labeled when it has a mask for at least one class; a class whose mask is
    absent is then empty (IDRiD ships no file for a lesion an image does not show)."""

    spec_class = SegmentationSpec
    activation = "sigmoid"
    dense = True
    teacher_spatial = "mask"
    default_kd_loss = "kl_dice"
    main_metric = "dice"

    def validate(self) -> None:
        if not self.spec.classes:
            raise ValueError(f"task {self.name!r}: segmentation needs a list of classes")
        weights = self.spec.pos_weight
        if weights is not None and (len(weights) != len(self.spec.classes) or min(weights) <= 0):
            raise ValueError(
                f"task {self.name!r}: pos_weight needs one positive number per class "
                f"{list(self.spec.classes)}; got {list(weights)}"
            )

    @property
    def out_channels(self) -> int:
        return len(self.spec.classes)

    def build_head(self, in_channels: int) -> nn.Module:
        return nn.Conv2d(in_channels, self.out_channels, kernel_size=3, padding=1)

    def required_masks(self) -> list[str]:
        return list(self.spec.classes)

    def target(self, ann: Annotation) -> torch.Tensor | None:
        if not any(c in ann.masks for c in self.spec.classes):
            return None
        empty = np.zeros((ann.size, ann.size), dtype=np.float32)
        planes = [np.asarray(ann.masks.get(c, empty), dtype=np.float32) for c in self.spec.classes]
        return torch.from_numpy(np.stack(planes))

    def empty_target(self, size: int) -> torch.Tensor:
        return torch.zeros(self.out_channels, size, size)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Pixel BCE plus soft Dice over the classes a sample shows (``_dice_loss``)."""
        weights = self.spec.pos_weight
        pos_weight = None if weights is None else pred.new_tensor(list(weights)).view(-1, 1, 1)
        bce = F.binary_cross_entropy_with_logits(
            pred, target, pos_weight=pos_weight, reduction="none"
        )
        bce = bce.flatten(1).mean(1)
        return bce + self.spec.dice_weight * _dice_loss(torch.sigmoid(pred), target)

    def channel_names(self) -> list[str]:
        return list(self.spec.classes)

    def summarise(self, value: torch.Tensor, frame: Frame) -> dict[str, Any]:
        """Mask areas; only pixels inside the field of view count (outside it the photograph is
        black)."""
        names = self.channel_names()
        area = ((value >= MASK_THRESHOLD) & frame.fov).flatten(1).sum(dim=1).tolist()
        fov_pixels = max(int(frame.fov.sum()), 1)
        return {
            "area_px": dict(zip(names, area)),
            "fov_fraction": {n: a / fov_pixels for n, a in zip(names, area)},
        }

    def summary_line(self, summary: dict[str, Any]) -> str:
        return "  ".join(
            f"{k}={a} px ({summary['fov_fraction'][k]:.1%} of FOV)"
            for k, a in summary["area_px"].items()
        )

    def overlay(self, value: torch.Tensor) -> Overlay:
        planes = value.detach().cpu().numpy()
        return Overlay(masks={c: p >= MASK_THRESHOLD for c, p in zip(self.channel_names(), planes)})

    def teacher_output(self, pred: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(pred.float())

    def teacher_at(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Probability maps resized (``resize``); a no-op at the same size, the usual case: the
        loader already brings cached maps to the working size."""
        return resize(output, size)

    def cache_shape(self, storage: CacheStorage) -> tuple[int, ...]:
        return (self.out_channels, storage.dense_size, storage.dense_size)

    def cache_dtype(self, storage: CacheStorage) -> np.dtype:
        return np.dtype(storage.dense_dtype)

    def encode_cache(self, output: torch.Tensor, storage: CacheStorage) -> np.ndarray:
        output = output.detach().float()
        size = storage.dense_size
        if output.shape[-1] != size:
            output = F.interpolate(output, size=(size, size), mode="area")
        if storage.dense_dtype == "uint8":
            return (output * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        return output.cpu().numpy().astype(storage.dense_dtype)

    def decode_cache(self, row: np.ndarray) -> np.ndarray:
        if row.dtype == np.uint8:
            return row.astype(np.float32) / 255.0
        return np.array(row, dtype=np.float32)

    def metrics(self) -> MetricCollection:
        n, names = self.out_channels, list(self.spec.classes)
        if n == 1:
            # torchmetrics' multilabel metrics need two labels; one class is a binary problem.
            return MetricCollection(
                {
                    "dice": BinaryF1Score(),
                    "iou": BinaryJaccardIndex(),
                    f"dice_{names[0]}": BinaryF1Score(),
                    f"iou_{names[0]}": BinaryJaccardIndex(),
                },
                compute_groups=False,
            )
        return MetricCollection(
            {
                "dice": MultilabelF1Score(n, average="macro"),
                "iou": MultilabelJaccardIndex(n, average="macro"),
                "dice_per_class": ClasswiseWrapper(
                    MultilabelF1Score(n, average="none"), labels=names, prefix="dice_"
                ),
                "iou_per_class": ClasswiseWrapper(
                    MultilabelJaccardIndex(n, average="none"), labels=names, prefix="iou_"
                ),
            },
            compute_groups=False,
        )

    def update_metrics(self, metrics, pred, target, batch) -> None:
        metrics.update(torch.sigmoid(pred.float()), target.long())

    def health_metrics(self) -> MetricCollection:
        n = self.out_channels
        auroc = (
            MultilabelAUROC(n, average="none", thresholds=64)
            if n > 1
            else BinaryAUROC(thresholds=64)
        )
        return MetricCollection(
            {"max_prob": ChannelMax(n), "auroc": OnPixelGrid(auroc)}, compute_groups=False
        )

    def stuck_hint(self, values: dict[str, torch.Tensor]) -> str | None:
        """Below the threshold everywhere: pixels ranked well (AUROC >= ``STUCK_AUROC``) but no
        probability reaching 0.5, so Dice is 0 (public disc/cup and vessel runs ended so)."""
        highest, auroc = values["max_prob"].flatten(), values["auroc"].flatten()
        stuck = [
            f"{c} (highest probability {float(p):.3f}, pixel AUROC {float(a):.2f})"
            for c, p, a in zip(self.spec.classes, highest, auroc)
            if p < MASK_THRESHOLD and a >= STUCK_AUROC
        ]
        if not stuck:
            return None
        return (
            f"no validation pixel reaches {MASK_THRESHOLD} for {', '.join(stuck)}: the ranking is "
            "learned, the masks are empty (Dice 0). Try more epochs, a larger "
            f"tasks.{self.name}.pos_weight, or optim.warmup_epochs=1 with a lower optim.lr"
        )

    def resampled_metrics(self, pred, target, extras, draws) -> dict[str, torch.Tensor]:
        """Dice and IoU pooled over each resample's pixels, as ``metrics()`` computes them
        (probability > 0.5; a class without any predicted or true pixel scores 0; ``dice`` and
        ``iou`` are the class means), from per-image true/false positive and false negative
        counts: a resample's counts are sums of its images' counts, one matrix product, where
        rerunning the metrics over every pixel took ~0.1 s per resample at 96 px."""
        hard, truth = (torch.sigmoid(pred.float()) > 0.5).flatten(2), (target > 0.5).flatten(2)
        per_image = [(a & b).sum(-1).double() for a, b in ((hard, truth), (hard, ~truth))]
        per_image.append((~hard & truth).sum(-1).double())  # N x C each: tp, fp, fn
        counts = draw_counts(draws, len(pred))
        tp, fp, fn = (counts @ c for c in per_image)
        scores = {"dice": (2 * tp, 2 * tp + fp + fn), "iou": (tp, tp + fp + fn)}
        out = {}
        for key, (num, den) in scores.items():
            value = torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))
            out[key] = value.mean(dim=1)
            out.update({f"{key}_{c}": value[:, i] for i, c in enumerate(self.spec.classes)})
        return out


class _BinaryKLDice(torch.autograd.Function):
    """``binary_kl_and_dice`` per sample, with its gradient written out. Autograd through the
    textbook form (BCE with logits minus the teacher's entropy, a second sigmoid for Dice) cost
    ~10 ms per dense task and step at 96 px on one CPU thread, mostly softplus / log1p (not
    vectorised on CPU) and fresh pixel-sized buffers; here every pixel op is a fast one
    (sigmoid, log, products), done in place where the buffer is ours, and the backward is
    d/dz = T / n (sigmoid(z / T) - q) + s (1 - s) d(dice loss)/ds, s = sigmoid(z), the Dice
    loss's label being ``mask``."""

    @staticmethod
    def forward(
        ctx,
        pred: torch.Tensor,
        teacher: torch.Tensor,
        mask: torch.Tensor,
        temperature: float,
        dice_weight: float,
    ) -> torch.Tensor:
        p = teacher.clamp(_EPS, 1 - _EPS)
        logit = torch.logit(p)
        if temperature == 1.0:
            z, q, log_not_q = pred, p, torch.sub(1, p).log_()
        else:
            logit = logit.div_(temperature)
            z, q, log_not_q = pred / temperature, torch.sigmoid(logit), torch.sigmoid(-logit).log_()
        # q log q + (1 - q) log(1 - q) = q logit(q) + log(1 - q): the teacher's negative entropy
        neg_entropy = logit.mul_(q).add_(log_not_q).flatten(1).sum(1)
        s_t = torch.sigmoid(z)
        # softplus(z) - q z = relu(z) - q z - log sigmoid(|z|); sigmoid(|z|) = max(s_t, 1 - s_t)
        buf = torch.sub(1, s_t)
        log_sig_abs = torch.maximum(buf, s_t, out=buf).log_().flatten(1).sum(1)
        linear = torch.clamp(z, min=0, out=buf).addcmul_(q, z, value=-1).flatten(1).sum(1)
        n = pred[0].numel()
        kl = (linear - log_sig_abs + neg_entropy) * (temperature**2 / n)
        s = s_t if temperature == 1.0 else torch.sigmoid(pred)
        num, den, weight = _dice_terms(s, mask)
        ctx.save_for_backward(s_t, q, s, mask, num, den, weight)
        ctx.scale = (temperature / n, dice_weight)
        return kl + dice_weight * ((1.0 - num / den) * weight).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        s_t, q, s, mask, num, den, weight = ctx.saved_tensors
        kl_scale, dice_weight = ctx.scale
        out = torch.sub(s_t, q).mul_(grad.view(-1, 1, 1, 1) * kl_scale)
        if dice_weight:
            # d(1 - num / den)/ds_i = (num / den - 2 m_i) / den, times the class's weight
            w = (grad[:, None] * dice_weight * weight / den)[..., None, None]
            dice = torch.add((num / den)[..., None, None], mask, alpha=-2.0).mul_(w).mul_(s)
            out.add_(dice).addcmul_(dice, s, value=-1)  # + s (1 - s) * dice
        return out, None, None, None, None


@register_kd_loss("segmentation", "kl_dice")
def binary_kl_and_dice(
    task: SegmentationTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * mean_pixels KL(q || sigmoid(z_s / T)) + dice_weight * (1 - softDice(sigmoid(z_s),
    [m >= 0.5])): the pixel-wise binary KL to the teacher's map m, softened as q =
    sigmoid(logit(m) / T), at the student's output size, plus the supervised loss's Dice term
    (``_dice_loss``) with the teacher's mask (what its overlay draws) as the label. The pixel mean
    alone is too faint for small structures: the distilled student lost the optic cup and every
    haemorrhage (dice 0) that the same student learns from labels alone. With m itself as a soft
    label, the student copied a few-pixel lesion as a blur whose peak stayed under 0.5 (the
    demo's seed-2 KD student: lesion Dice 0, highest probabilities 0.36 / 0.43 / 0.23, where its
    teacher reached 0.77 / 1.00): the mask asks for the lesion itself. Computed by
    ``_BinaryKLDice`` (same value and gradient, a third of the time)."""
    teacher = task.teacher_at(teacher, tuple(pred.shape[-2:])).detach()
    mask = (teacher >= MASK_THRESHOLD).to(teacher.dtype)
    return _BinaryKLDice.apply(
        pred, teacher, mask, float(temperature), float(task.spec.dice_weight)
    )


@register_kd_loss("segmentation", "cwd")
def channel_wise_divergence(
    task: SegmentationTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021): T^2 / C * sum_c KL(phi(y_t,c) ||
    phi(y_s,c)), phi(y_c) = softmax(y_c / T) over the H * W positions of channel c, with
    y_t = logit(m) of the teacher's map m clamped to [1e-4, 1 - 1e-4] (exact 0 and 1 would be
    infinite logits), at the student's output size. Each channel becomes a distribution over
    *where* the class lies, blind to a per-channel shift of the logits: it says nothing about
    *whether* the class is present (an empty teacher map asks for a flat student map), which is
    left to the supervised loss."""
    teacher = task.teacher_at(teacher, tuple(pred.shape[-2:])).detach()
    logits = torch.logit(teacher.clamp(_EPS, 1 - _EPS))
    log_q_t = F.log_softmax(logits.flatten(2) / temperature, dim=-1)
    log_q_s = F.log_softmax(pred.flatten(2) / temperature, dim=-1)
    kl = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=-1)
    return kl.mean(dim=1) * temperature**2
