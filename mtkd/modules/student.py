"""StudentModule: L = sum_t w_t [(1 - a_t) L_sup_t + a_t L_kd_t].

Supervised terms average over labeled samples; KD terms over every sample with a teacher
output, so unlabeled images contribute KD only; a task no teacher covers trains on labels only.
Teacher outputs come from the injected ``TeacherSource`` (``mtkd.kd.teacher_source``): the
cache, the frozen teacher on the same view, or none (no KD: every task on labels only).

Feature-level KD (``kd.features.weight`` > 0; Li & Bilen, ECCV 2020, on the global pooled vector
only): per teacher i a linear adaptor a_i maps the student's pooled vector f_s to that teacher's
embedding space, and ``weight * mean_i mean_b ||a_i(f_s)/|a_i(f_s)| - f_i/|f_i|||^2`` joins the
loss (``train/features/kd``). The embeddings come from the teacher cache; the adaptors train with
the student and are left out of the exported network (``net`` only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.kd.cache import TeacherCache, feature_name
from mtkd.kd.teacher_source import TeacherSource, build_teacher_source
from mtkd.modules.common import MultiTaskModule, fp32
from mtkd.tasks import Task, masked_mean


def feature_kd_loss(adapted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per sample ||a/|a| - t/|t|||^2 (= 2 - 2 cos(a, t)): only the direction is matched, so
    the student need not reproduce the teacher's feature scale."""
    return (F.normalize(adapted, dim=1) - F.normalize(teacher, dim=1)).pow(2).sum(dim=1)


def with_feature_dims(config: dict[str, Any], cache: TeacherCache | None) -> dict[str, Any]:
    """``config`` with ``kd.features.dims`` read from the run's teacher ``cache`` when feature
    KD is on and they are not given; the checkpoint saves them, so evaluating or resuming needs
    no cache."""
    kd = config.get("kd", {})
    features = kd.get("features", {})
    if float(features.get("weight", 0.0)) <= 0 or features.get("dims") is not None:
        return config
    dims = cache.feature_dims if cache is not None else None
    if dims is None:
        held = "has none" if cache is not None else "was not given to the student"
        raise ValueError(
            f"kd.features.weight={features['weight']} reads the teacher embeddings from the "
            f"teacher cache, and {kd.get('cache_dir')} {held}; build it with `mtkd cache-teacher "
            f"kd.features.weight={features['weight']} kd.cache_dir={kd.get('cache_dir')}`"
        )
    return {**config, "kd": {**kd, "features": {**features, "dims": dims}}}


class StudentModule(MultiTaskModule):
    def __init__(
        self,
        config: dict[str, Any],
        teacher_source: TeacherSource | None = None,
        tasks: dict[str, Task] | None = None,
    ) -> None:
        """``teacher_source``: where teacher outputs come from (a cache-reading one holds the
        run's checked cache); None builds ``kd.mode``'s source without a cache, enough for a
        student loaded for inference. ``tasks``: see ``MultiTaskModule``."""
        source = teacher_source
        if source is None:
            source = build_teacher_source(config["kd"]["mode"])
        super().__init__(with_feature_dims(config, source.cache), tasks)
        kd = self.cfg.kd
        self.teacher_source = source
        # Each task holds its parsed kd.tasks.<task> entry (build_tasks); null takes the run's.
        self.alpha = {
            n: float(kd.alpha if t.kd.alpha is None else t.kd.alpha) for n, t in self.tasks.items()
        }
        self.temperature = {
            n: float(t.kd.temperature or kd.temperature or t.default_temperature)
            for n, t in self.tasks.items()
        }
        features = kd.get("features", {})
        self.feature_weight = float(features.get("weight", 0.0))
        dims = features.get("dims") if self.feature_weight > 0 else None
        #: per teacher, the student's pooled vector -> that teacher's embedding (empty when off)
        self.feature_adaptors = nn.ModuleList(
            [nn.Linear(self.net.pooled_dim, int(d)) for d in dims or []]
        )
        self.feature_cache: TeacherCache | None = None

    def setup(self, stage: str) -> None:
        """Training alone reads the teacher: testing or predicting a student needs none."""
        if stage != "fit":
            return
        self.teacher_source.setup(self.cfg)
        if self.feature_adaptors:
            self.feature_cache = self.checked_feature_cache()

    def checked_feature_cache(self) -> TeacherCache:
        """The teacher source's (checked) cache, refused unless it holds one embedding per
        adaptor of the lengths they map to."""
        cache = self.teacher_source.cache
        weight = self.feature_weight
        if cache is None:
            raise ValueError(
                f"kd.features.weight={weight} reads the teacher embeddings from the teacher cache: "
                "use kd.mode=cached (or kd.features.weight=0)"
            )
        want = [a.out_features for a in self.feature_adaptors]
        if cache.feature_dims != want:
            raise ValueError(
                f"teacher cache {cache.dir} holds teacher embeddings of lengths "
                f"{cache.feature_dims}, this run's adaptors map to {want} (kd.features.dims); "
                f"rebuild it: `mtkd cache-teacher kd.features.weight={weight} "
                f"kd.cache_dir={cache.dir}`"
            )
        return cache

    def on_fit_start(self) -> None:
        self.teacher_source.to(self.device)

    def kd_losses(
        self, outputs: dict, teacher: dict, taught: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """KD terms of the tasks a teacher covers (``teacher`` has no entry for the others),
        each over the images a teacher teaches (``taught``: the tasks whose teachers teach some
        data sources only; 0 when no image of the batch is taught)."""
        losses, taught = {}, taught or {}
        for n, task in self.tasks.items():
            if n not in teacher:
                continue
            per_sample = fp32(
                lambda s, t, task=task, n=n: task.kd_loss(s, t, self.temperature[n]),
                outputs[n],
                teacher[n],
            )
            losses[n] = masked_mean(per_sample, taught[n]) if n in taught else per_sample.mean()
        return losses

    def outputs_and_pooled(self, image: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """``forward``'s outputs and the pooled vector the feature adaptors read."""
        return self.net.forward_with_pooled(self.net_input(image))

    def feature_loss(
        self, pooled: torch.Tensor, sample_ids: list[str], taught: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``feature_kd_loss`` of each adaptor against its teacher's cached embeddings,
        averaged over the batch (over the images of its sources, for a teacher limited to some:
        ``taught``) and then over the teachers."""
        cached = [
            torch.from_numpy(c).to(pooled.device) for c in self.feature_cache.features(sample_ids)
        ]
        losses = []
        for i, (adaptor, target) in enumerate(zip(self.feature_adaptors, cached)):
            per_sample = fp32(lambda s, t, a=adaptor: feature_kd_loss(a(s), t), pooled, target)
            mask = taught.get(feature_name(i))
            losses.append(per_sample.mean() if mask is None else masked_mean(per_sample, mask))
        return torch.stack(losses).mean()

    def step_losses(self, batch: dict) -> tuple[torch.Tensor, dict[tuple[str, str], torch.Tensor]]:
        """Total loss and every logged term of one training batch, keyed ``(task, term)``
        with term ``sup``, ``kd`` or ``loss`` (and ``("features", "kd")``)."""
        if self.feature_adaptors:
            outputs, pooled = self.outputs_and_pooled(batch["image"])
        else:  # the network's own forward, as a wrapper around it (DDP) expects
            outputs = self(batch["image"])
        sup = self.supervised_losses(outputs, batch)
        terms = {(n, "sup"): v for n, v in sup.items()}
        taught = self.teacher_source.taught(batch)
        kd = self.kd_losses(outputs, self.teacher_source.outputs(batch), taught)
        terms.update({(n, "kd"): v for n, v in kd.items()})
        # A task no teacher covers trains on labels only (alpha 0; announced at start-up).
        per_task = {
            n: (1 - self.alpha[n]) * sup[n] + self.alpha[n] * kd[n] if n in kd else sup[n]
            for n in self.tasks
        }
        terms.update({(n, "loss"): v for n, v in per_task.items()})
        total = self.weighting(per_task)
        if self.feature_adaptors:
            terms["features", "kd"] = self.feature_loss(pooled, batch["sample_id"], taught)
            total = total + self.feature_weight * terms["features", "kd"]
        return total, terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, terms = self.step_losses(batch)
        self.guard_finite(total, terms)
        self.log_train_terms(terms, total, len(batch["image"]))
        return total
