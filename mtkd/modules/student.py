"""StudentModule: L = sum_t w_t [(1 - a_t) L_sup_t + a_t L_kd_t].

Supervised terms average over labeled samples; KD terms over every sample with a teacher
output, so unlabeled images contribute KD only; a task no teacher covers trains on labels only.
Teacher outputs come from the injected ``TeacherSource`` (``mtkd.kd.teacher_source``): the
cache, the frozen teacher on the same view, or none (no KD: every task on labels only).

Feature-level KD (Li & Bilen, "Knowledge distillation for multi-task learning", ECCV 2020): per
teacher i a learned adaptor a_i maps the student's shared features f_s onto that teacher's, and
the distance of the L2-normalised features ``||a_i(f_s)/|a_i(f_s)| - f_i/|f_i|||^2`` joins the
loss, averaged over the batch and then over the teachers. On the global pooled vector
(``kd.features.weight`` > 0, a linear a_i, ``train/features/kd``) and on the encoder's feature map
at ``kd.features.map_stride`` (``kd.features.map_weight`` > 0, a 1x1 conv a_i, the distance taken
per pixel over channels and averaged over pixels, ``train/feature_maps/kd``). The teacher
features come from the teacher cache (the maps moved with the image's augmentation by the data
module); the adaptors train with the student and are left out of the exported network (``net``
only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.kd.cache import TeacherCache, feature_map_name, feature_name
from mtkd.kd.teacher_source import TeacherSource, build_teacher_source
from mtkd.modules.common import MultiTaskModule, fp32
from mtkd.tasks import Task, masked_mean
from mtkd.tasks.base import resize


def feature_kd_loss(adapted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per sample ||a/|a| - t/|t|||^2 (= 2 - 2 cos(a, t)) over dim 1, the channels: only the
    direction is matched, so the student need not reproduce the teacher's feature scale. For
    B x C x h x w maps it is taken at each pixel and averaged over the pixels."""
    distance = (F.normalize(adapted, dim=1) - F.normalize(teacher, dim=1)).pow(2).sum(dim=1)
    return distance.reshape(len(distance), -1).mean(dim=1)


#: the weight that turns a feature KD variant on -> (the config key of its teacher feature
#: sizes, what the cache holds of them, what the student matches)
FEATURE_SIZES = {
    "weight": ("dims", "feature_dims", "embeddings"),
    "map_weight": ("map_channels", "map_channels", "feature maps"),
}


def with_feature_dims(config: dict[str, Any], cache: TeacherCache | None) -> dict[str, Any]:
    """``config`` with ``kd.features.dims`` (``map_channels``) read from the run's teacher
    ``cache`` when feature KD on the embedding (map) is on and they are not given; the
    checkpoint saves them, so evaluating or resuming needs no cache."""
    kd = config.get("kd", {})
    features = dict(kd.get("features", {}))
    for weight, (key, held, what) in FEATURE_SIZES.items():
        if float(features.get(weight, 0.0)) <= 0 or features.get(key) is not None:
            continue
        sizes = getattr(cache, held) if cache is not None else None
        if sizes is None:
            state = "has none" if cache is not None else "was not given to the student"
            raise ValueError(
                f"kd.features.{weight}={features[weight]} reads the teacher {what} from the "
                f"teacher cache, and {kd.get('cache_dir')} {state}; build it with `mtkd "
                f"cache-teacher kd.features.{weight}={features[weight]} "
                f"kd.cache_dir={kd.get('cache_dir')}`"
            )
        features[key] = sizes
    return {**config, "kd": {**kd, "features": features}}


def at_size(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """A student feature map resized (bilinear) to its teacher's map size; a vector as it is."""
    return resize(student, tuple(teacher.shape[-2:])) if student.ndim == 4 else student


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
        self.map_weight = float(features.get("map_weight", 0.0))
        #: the stride of the matched feature maps; None: dense feature KD is off
        self.map_stride = int(features["map_stride"]) if self.map_weight > 0 else None
        channels = features.get("map_channels") if self.map_stride else None
        mine = self.net.map_channels(self.map_stride) if self.map_stride else 0
        #: per teacher, a 1x1 conv: the student's feature map -> that teacher's (empty when off)
        self.map_adaptors = nn.ModuleList([nn.Conv2d(mine, int(c), 1) for c in channels or []])
        self.feature_cache: TeacherCache | None = None

    def setup(self, stage: str) -> None:
        """Training alone reads the teacher: testing or predicting a student needs none."""
        if stage != "fit":
            return
        self.teacher_source.setup(self.cfg)
        if self.feature_adaptors or self.map_adaptors:
            self.feature_cache = self.checked_feature_cache()

    def checked_feature_cache(self) -> TeacherCache:
        """The teacher source's (checked) cache, refused unless it holds one embedding (feature
        map, at the run's stride) per adaptor of the sizes they map to."""
        cache = self.teacher_source.cache
        weights = {"weight": self.feature_weight, "map_weight": self.map_weight}
        named = " ".join(f"kd.features.{k}={v}" for k, v in weights.items() if v > 0)
        if cache is None:
            raise ValueError(
                f"{named} reads the teacher features from the teacher cache: use kd.mode=cached "
                "(or turn it off with 0)"
            )
        checks = [
            ("dims", self.feature_weight, [a.out_features for a in self.feature_adaptors]),
            ("map_channels", self.map_weight, [a.out_channels for a in self.map_adaptors]),
            ("map_stride", self.map_weight, self.map_stride),
        ]
        held = {"dims": cache.feature_dims, "map_channels": cache.map_channels}
        held["map_stride"] = cache.map_stride
        for key, weight, want in checks:
            if weight > 0 and want != held[key]:
                raise ValueError(
                    f"teacher cache {cache.dir} holds teacher features of {key} {held[key]}, this "
                    f"run's adaptors want {want} (kd.features.{key}); rebuild it: "
                    f"`mtkd cache-teacher {named} kd.cache_dir={cache.dir}`"
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

    def outputs_and_features(
        self, image: torch.Tensor, guides: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """``forward``'s outputs, the pooled vector and (dense feature KD on) the feature map
        the adaptors read."""
        return self.net.forward_with_features(image, self.map_stride, guides)

    def feature_loss(
        self,
        adaptors: nn.ModuleList,
        student: torch.Tensor,
        targets: list[torch.Tensor],
        taught: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """``feature_kd_loss`` of each adaptor on the student's features against its teacher's
        (``targets``, in teacher order; a map resized to the teacher's first), averaged over the
        batch (over the images of its sources, for a teacher limited to some: ``taught``) and
        then over the teachers."""
        losses = []
        for i, (adaptor, target) in enumerate(zip(adaptors, targets)):
            per_sample = fp32(
                lambda s, t, a=adaptor: feature_kd_loss(a(at_size(s, t)), t),
                student,
                target.to(student.device),
            )
            mask = taught.get(feature_name(i))
            losses.append(per_sample.mean() if mask is None else masked_mean(per_sample, mask))
        return torch.stack(losses).mean()

    def step_losses(self, batch: dict) -> tuple[torch.Tensor, dict[tuple[str, str], torch.Tensor]]:
        """Total loss and every logged term of one training batch, keyed ``(task, term)``
        with term ``sup``, ``kd`` or ``loss`` (and ``("features", "kd")``,
        ``("feature_maps", "kd")``)."""
        teacher = self.teacher_source.outputs(batch)
        guides = self.guides(batch, teacher)
        if self.feature_adaptors or self.map_adaptors:
            outputs, pooled, feature_map = self.outputs_and_features(batch["image"], guides)
        else:  # the network's own forward, as a wrapper around it (DDP) expects
            outputs = self(batch["image"], guides)
        sup = self.supervised_losses(outputs, batch)
        terms = {(n, "sup"): v for n, v in sup.items()}
        taught = self.teacher_source.taught(batch)
        kd = self.kd_losses(outputs, teacher, taught)
        terms.update({(n, "kd"): v for n, v in kd.items()})
        # A task no teacher covers trains on labels only (alpha 0; announced at start-up).
        per_task = {
            n: (1 - self.alpha[n]) * sup[n] + self.alpha[n] * kd[n] if n in kd else sup[n]
            for n in self.tasks
        }
        terms.update({(n, "loss"): v for n, v in per_task.items()})
        total = self.weighting(per_task)
        if self.feature_adaptors:
            cached = self.feature_cache.features(batch["sample_id"])
            targets = [torch.from_numpy(c) for c in cached]
            terms["features", "kd"] = self.feature_loss(
                self.feature_adaptors, pooled, targets, taught
            )
            total = total + self.feature_weight * terms["features", "kd"]
        if self.map_adaptors:
            # the cached maps ride in the batch, moved with the image (``TeacherCache.carried``)
            maps = [batch["teacher"][feature_map_name(i)] for i in range(len(self.map_adaptors))]
            terms["feature_maps", "kd"] = self.feature_loss(
                self.map_adaptors, feature_map, maps, taught
            )
            total = total + self.map_weight * terms["feature_maps", "kd"]
        return total, terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, terms = self.step_losses(batch)
        self.guard_finite(total, terms)
        self.log_train_terms(terms, total, len(batch["image"]))
        return total
