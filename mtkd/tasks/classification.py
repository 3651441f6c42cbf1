"""Multi-class classification (e.g. DR grade), optionally ordinal."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassCohenKappa

from mtkd.kd.losses import register_kd_loss
from mtkd.tasks.base import (
    Annotation,
    Frame,
    Task,
    TaskSpec,
    draw_counts,
    global_head,
    register_task,
)


@dataclass
class ClassificationSpec(TaskSpec):
    num_classes: int = 2
    label: str | None = None
    ordinal: bool = False
    #: weight of the squared expected-grade error added to cross-entropy when ordinal
    ordinal_weight: float = 1.0
    loss_only: ClassVar[tuple[str, ...]] = (*TaskSpec.loss_only, "ordinal_weight")
    class_names: list[str] | None = None


@register_task("classification")
class ClassificationTask(Task):
    spec_class = ClassificationSpec
    activation = "softmax"
    single_class = True
    default_temperature = 4.0
    default_kd_loss = "kl"
    main_metric = "kappa"

    def validate(self) -> None:
        if self.spec.num_classes < 2:
            raise ValueError(f"task {self.name!r}: num_classes must be >= 2")
        names = self.spec.class_names
        if names is not None and len(names) != self.spec.num_classes:
            raise ValueError(f"task {self.name!r}: class_names must have num_classes entries")

    @property
    def out_channels(self) -> int:
        return self.spec.num_classes

    @property
    def label(self) -> str:
        return self.spec.label or self.name

    def build_head(self, in_channels: int) -> nn.Module:
        return global_head(in_channels, self.out_channels)

    def target(self, ann: Annotation) -> torch.Tensor | None:
        value = ann.labels.get(self.label)
        if value is None:
            return None
        cls = int(value)
        if cls != value or not 0 <= cls < self.spec.num_classes:
            raise ValueError(
                f"task {self.name!r}: label {value!r} is not a class index in [0, {self.spec.num_classes})"
            )
        return torch.tensor(cls, dtype=torch.long)

    def empty_target(self, size: int) -> torch.Tensor:
        return torch.tensor(0, dtype=torch.long)

    def label_problems(self, labels, masks, points) -> list[str] | None:
        value = labels.get(self.label)
        if value is None:
            return None
        if 0 <= value < self.spec.num_classes and value == int(value):  # NaN fails the first test
            return []
        return [f"{self.label}={value!r} is not a class index in [0, {self.spec.num_classes})"]

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(pred, target, reduction="none")
        if self.spec.ordinal:
            # Penalise the distance between the expected grade and the true grade, so that
            # confusing grade 0 with 4 costs more than 0 with 1.
            grades = torch.arange(self.out_channels, device=pred.device, dtype=pred.dtype)
            expected = (pred.softmax(dim=1) * grades).sum(dim=1)
            scale = (self.out_channels - 1) ** 2
            loss = loss + self.spec.ordinal_weight * (expected - target.to(pred.dtype)) ** 2 / scale
        return loss

    def combine_teachers(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Average the teachers' probabilities; return their log (valid logits), computed as
        log-mean-exp of log-softmax: log(mean(softmax)) turned a probability that underflows
        to 0 into -inf in the cache, and the KD loss's 0 * -inf into NaN."""
        log_probs = torch.stack([o.log_softmax(dim=1) for o in outputs])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs))

    def channel_names(self) -> list[str]:
        return list(self.spec.class_names or [str(i) for i in range(self.out_channels)])

    def summarise(self, value: torch.Tensor, frame: Frame) -> dict[str, Any]:
        names, probs = self.channel_names(), value.tolist()
        best = int(value.argmax())
        return {"class": names[best], "index": best, "probabilities": dict(zip(names, probs))}

    def summary_line(self, summary: dict[str, Any]) -> str:
        return f"{summary['class']} (p={summary['probabilities'][summary['class']]:.2f})"

    def caption(self, value: torch.Tensor, target: torch.Tensor | None) -> str:
        return f"{int(value.argmax())} (true {'?' if target is None else int(target)})"

    def metrics(self) -> MetricCollection:
        c = self.spec.num_classes
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(c, average="micro"),
                "balanced_acc": MulticlassAccuracy(c, average="macro"),
                "kappa": MulticlassCohenKappa(c, weights="quadratic"),
                "auroc": MulticlassAUROC(c, average="macro"),
            }
        )

    def update_metrics(self, metrics, pred, target, batch) -> None:
        metrics.update(pred.float().softmax(dim=1), target)

    def health_metrics(self) -> MetricCollection:
        return MetricCollection({"predicted": PredictedClasses(self.spec.num_classes)})

    def resampled_metrics(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        extras: dict[str, torch.Tensor],
        draws: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``metrics()`` on every resample from one confusion matrix per resample (a weighted
        sum: ``draw_counts``), as torchmetrics 1.x defines them: accuracy; balanced accuracy
        over the classes a resample shows or predicts; quadratic kappa (NaN where both sides
        hold one class); one-vs-rest AUROC per class, 0 where a resample lacks the class or its
        complement, averaged. Rerunning the torchmetrics took ~1.5 s per task and model for
        1000 resamples, a tenth of the demo; equal to them on every resample (test_bootstrap)."""
        if set(self.metrics()) != {"acc", "balanced_acc", "kappa", "auroc"}:
            return super().resampled_metrics(pred, target, extras, draws)  # a subclass's metrics
        k = self.out_channels
        probs = pred.float().softmax(dim=1)  # as update_metrics feeds the torchmetrics
        truth = F.one_hot(target.long(), k).double()
        guess = F.one_hot(probs.argmax(dim=1), k).double()
        counts = draw_counts(draws, len(pred))
        pairs = (truth[:, :, None] * guess[:, None, :]).flatten(1)  # N x K*K (true, predicted)
        confusion = (counts @ pairs).view(-1, k, k)
        drawn = counts.sum(dim=1)
        right = confusion.diagonal(dim1=1, dim2=2)
        shown, predicted = confusion.sum(dim=2), confusion.sum(dim=1)
        recall = right / shown.clamp(min=1)
        present = ((shown + predicted) > 0).double()
        grades = torch.arange(k, dtype=torch.float64)
        penalty = (grades[:, None] - grades[None, :]) ** 2
        expected = shown[:, :, None] * predicted[:, None, :] / drawn[:, None, None]
        disagreement = (penalty * confusion).sum(dim=(1, 2)) / (penalty * expected).sum(dim=(1, 2))
        aurocs = [_weighted_auroc(probs[:, c], target == c, counts) for c in range(k)]
        return {
            "acc": right.sum(dim=1) / drawn,
            "balanced_acc": (recall * present).sum(dim=1) / present.sum(dim=1).clamp(min=1),
            "kappa": 1 - disagreement,
            "auroc": torch.stack(aurocs, dim=1).mean(dim=1),
        }

    def stuck_hint(self, values: dict[str, torch.Tensor]) -> str | None:
        """At the class prior: one class predicted for every validation image, so kappa is 0
        (a 10-epoch student's DR head stayed so in 1 of 3 seeds)."""
        predicted = values["predicted"]
        if int((predicted > 0).sum()) != 1:
            return None
        only = self.channel_names()[int(predicted.argmax())]
        return (
            f"predicts class {only} for every one of its {int(predicted.sum())} validation "
            "images (kappa 0): the head is at its class prior. Try optim.warmup_epochs=1 or 2, a "
            f"lower optim.lr, more epochs, or a larger tasks.{self.name}.weight"
        )


def _weighted_auroc(
    score: torch.Tensor, positive: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Per resample (``counts``: R x N draws per sample), the ROC AUC of ``score`` for
    ``positive``: P(score of a positive > score of a negative) + P(tie) / 2 over the drawn pairs,
    which is the trapezoid under torchmetrics' exact ROC curve; 0 where a resample has no
    positive or no negative, where torchmetrics' curve is all zeros."""
    _, group = torch.unique(score, return_inverse=True)  # equal scores form one group, ascending
    member = F.one_hot(group).double()  # N x G
    pos = (counts * positive.double()) @ member  # R x G
    neg = (counts * (~positive).double()) @ member
    below = neg.cumsum(dim=1) - neg  # negatives strictly below each group
    area = (pos * (below + neg / 2)).sum(dim=1)
    pairs = pos.sum(dim=1) * neg.sum(dim=1)
    return torch.where(pairs > 0, area / pairs.clamp(min=1), torch.zeros_like(area))


class PredictedClasses(Metric):
    """How many images each class was predicted for (the argmax)."""

    full_state_update = False

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.counts += torch.bincount(preds.argmax(dim=1), minlength=len(self.counts))

    def compute(self) -> torch.Tensor:
        return self.counts


@register_kd_loss("classification", "kl")
def kl_divergence(
    task: ClassificationTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al.'s KD: T^2 * KL(p_t || p_s) = T^2 * sum_c p_t,c (log p_t,c - log p_s,c), with
    p = softmax(z / T) of the student's and the teacher's logits (cached: log-probabilities)."""
    log_p_student = F.log_softmax(pred / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl * temperature**2


#: DKD's weights of its target-class (TCKD) and non-target (NCKD) terms: the reference
#: implementation's defaults (mdistiller ``CFG.DKD``, the paper's CIFAR-100 setting, at T = 4 like
#: this kind's ``default_temperature``); its ImageNet runs used beta = 0.5 at T = 1.
DKD_ALPHA = 1.0
DKD_BETA = 8.0


def decoupled_kd_terms(
    pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's (TCKD, NCKD) per sample, the target class being the teacher's argmax (``dkd``).
    Both from log-softmax, never a log of a probability: finite for any finite logits."""
    teacher = teacher.detach()
    target = F.one_hot(teacher.argmax(dim=1), teacher.shape[1]).bool()
    log_p_s = F.log_softmax(pred / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)

    def binary(log_p: torch.Tensor) -> torch.Tensor:
        # log (b_target, b_other): the target's log-probability, logsumexp of the others'
        others = log_p.masked_fill(target, -math.inf).logsumexp(dim=1)
        return torch.stack([log_p[target], others], dim=1)

    def non_target(logits: torch.Tensor) -> torch.Tensor:
        # log-softmax over the K - 1 non-target logits (boolean indexing keeps their order)
        rest = logits[~target].view(len(logits), -1)
        return F.log_softmax(rest / temperature, dim=1)

    def kl(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        return (log_t.exp() * (log_t - log_s)).sum(dim=1) * temperature**2

    tckd = kl(binary(log_p_t), binary(log_p_s))
    nckd = kl(non_target(teacher), non_target(pred))
    return tckd, nckd


@register_kd_loss("classification", "dkd")
def decoupled_kd(
    task: ClassificationTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): DKD_ALPHA * TCKD + DKD_BETA * NCKD, with
    TCKD = T^2 KL(b_t || b_s) over the binary (target, non-target) probabilities
    b = (p_k, 1 - p_k), and NCKD = T^2 KL(p^_t || p^_s) over p^ = softmax(z_{-k} / T), the
    non-target classes alone; classic KD is TCKD + (1 - p_t,k) NCKD, which mutes NCKD exactly
    where the teacher is confident. The target k is the teacher's argmax, not the label: the
    loss sees no label, and unlabeled images (KD only) have none."""
    tckd, nckd = decoupled_kd_terms(pred, teacher, temperature)
    return DKD_ALPHA * tckd + DKD_BETA * nckd
