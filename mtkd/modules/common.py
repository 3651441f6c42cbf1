"""What the teacher and the student share: the network, supervised losses over labeled samples,
metrics per stage, NaN guard, optimiser and scheduler.

``<stage>/loss`` is ``sum_t w_t L_t``, the supervised losses with the configured task weights,
whatever ``run.weighting`` adapts during training. ``<stage>/score`` (val/score: the default
checkpoint monitor) is ``sum_t w_t s_t / sum_t w_t`` over the tasks labeled in that split, with
``s_t = Task.score``: each task's main metric in [0, 1], 0 at chance. A summed loss hardly
moves when one head leaves its prior or a dense head first crosses its threshold; the score
does."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn
from torchmetrics import MeanMetric

from mtkd.config import import_plugins
from mtkd.models.multitask import MultiTaskNet
from mtkd.modules.optim import build_optimizer, build_schedule
from mtkd.modules.weighting import build_weighting
from mtkd.status import status_logger
from mtkd.tasks import Task, build_tasks, masked_mean

log = status_logger(__name__)

EVAL_STAGES = ("val", "test")


def fp32(fn, *args: torch.Tensor) -> torch.Tensor:
    """Run a loss in float32 outside autocast, whatever the training precision."""
    with torch.autocast(device_type=args[0].device.type, enabled=False):
        return fn(*(a.float() if a.is_floating_point() else a for a in args))


class MultiTaskModule(L.LightningModule):
    def __init__(self, config: dict[str, Any], tasks: dict[str, Task] | None = None) -> None:
        """``tasks``: the run's tasks, built once from ``config`` by whoever builds the run
        (``stages.build_run``); None builds them here (a checkpoint being loaded)."""
        super().__init__()
        self.save_hyperparameters({"config": config}, logger=False)
        self.cfg = OmegaConf.create(config)
        import_plugins(list(config.get("plugins", [])))
        if tasks is None:
            tasks = build_tasks(config["tasks"], config.get("kd", {}).get("tasks", {}))
        self.tasks = tasks
        self.net = MultiTaskNet(self.tasks, self.cfg.model)
        self.weighting = build_weighting(
            self.cfg.run.weighting, {n: t.weight for n, t in self.tasks.items()}
        )
        self.metrics = nn.ModuleDict(
            {s: nn.ModuleDict({n: t.metrics() for n, t in self.tasks.items()}) for s in EVAL_STAGES}
        )
        # Per-task evaluation loss weighted by labeled samples, synced like the other metrics:
        # a rank whose batches carry no label for a task must not skip a collective.
        self.eval_losses = nn.ModuleDict(
            {s: nn.ModuleDict({n: MeanMetric() for n in self.tasks}) for s in EVAL_STAGES}
        )
        # The total too: self.log(sync_dist=True) averages the int64 batch-size count in place on
        # gloo ((4 + 3) / 2 -> 3), which skews the epoch mean when the ranks' sizes differ.
        self.eval_totals = nn.ModuleDict({s: MeanMetric() for s in EVAL_STAGES})
        self._labeled = {s: torch.zeros(len(self.tasks)) for s in EVAL_STAGES}
        #: per task, (sum of its loss x batch size, samples) over the epoch's batches
        self._epoch_losses: dict[str, list[float]] = {}
        # What Task.stuck_hint reads beyond the logged metrics, filled in one validation pass.
        self.health = nn.ModuleDict(
            {n: h for n, t in self.tasks.items() if (h := t.health_metrics()) is not None}
        )
        self._stuck_checked = False

    def forward(
        self, image: torch.Tensor, guides: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return self.net(image, guides)

    def guides(self, batch: dict, teacher: dict | None = None) -> dict[str, torch.Tensor]:
        """What each guided head reads besides the features (``Task.guide``): the batch's
        reference and, given ``teacher`` (the batch's teacher outputs), the teacher's."""
        teacher = teacher or {}
        return {
            n: g
            for n, t in self.tasks.items()
            if (g := t.guide(batch["targets"][n], teacher.get(n))) is not None
        }

    # -- losses ------------------------------------------------------------------------------
    def supervised_losses(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        """Per-task supervised loss averaged over labeled samples only (0 when none)."""
        return {
            n: masked_mean(fp32(t.loss, outputs[n], batch["targets"][n]), batch["has"][n])
            for n, t in self.tasks.items()
        }

    def guard_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if not torch.isfinite(loss):
            bad = [n for n, v in terms.items() if not torch.isfinite(v)]
            raise FloatingPointError(
                f"training loss became {loss.item()} at step {self.global_step} (non-finite terms: "
                f"{bad or 'total'}). Stopping instead of training on. Lower optim.lr, prefer "
                "trainer.precision=bf16-mixed or 32-true over 16-mixed, or check the inputs."
            )

    def log_train_terms(
        self, terms: dict[tuple[str, str], torch.Tensor], total: torch.Tensor, batch_size: int
    ) -> None:
        """Log each ``(task, term)`` as ``train/<task>/<term>`` and the total as ``train/loss``;
        keep the epoch means of the ``(task, "loss")`` terms a weighting strategy reads."""
        for (task, term), value in terms.items():
            self.log(f"train/{task}/{term}", value.detach(), on_epoch=True, batch_size=batch_size)
            if self.weighting.needs_epoch_means and term == "loss":
                # Weighted by batch size, as Lightning's train/<task>/loss_epoch: an epoch's odd
                # last batch must not count as much as a full one.
                running = self._epoch_losses.setdefault(task, [0.0, 0.0])
                running[0] += float(value.detach()) * batch_size
                running[1] += batch_size
        self.log(
            "train/loss",
            total.detach(),
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
        )

    def on_train_epoch_end(self) -> None:
        means = {
            task: weighted / samples for task, (weighted, samples) in self._epoch_losses.items()
        }
        self.weighting.end_epoch(means)
        for name, w in self.weighting.current().items():
            self.log(f"train/{name}/weight", w, on_step=False, on_epoch=True)
        self._epoch_losses.clear()

    # -- evaluation ----------------------------------------------------------------------------
    def _checks_stuck_heads(self, stage: str) -> bool:
        """Once per run, in the first validation after a quarter of the epochs."""
        trainer = self.trainer
        return (
            stage == "val"
            and not self._stuck_checked
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and (self.current_epoch + 1) * 4 >= max(trainer.max_epochs or 1, 1)
        )

    def _eval_step(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        """Update the stage's metrics; returns the outputs, for callbacks that score more
        (``mtkd evaluate``'s ``SplitRecorder``)."""
        outputs = self(batch["image"], self.guides(batch))
        losses = self.supervised_losses(outputs, batch)
        size = batch["image"].shape[0]
        checks = self._checks_stuck_heads(stage)
        for i, (name, task) in enumerate(self.tasks.items()):
            has = batch["has"][name]
            if has.any():
                self._labeled[stage][i] += has.sum().cpu()
                collections = [self.metrics[stage][name]]
                if checks and name in self.health:
                    collections.append(self.health[name])
                for collection in collections:
                    task.update_metrics(
                        collection,
                        outputs[name][has],
                        batch["targets"][name][has],
                        {"pixel_scale": batch["pixel_scale"][has]},
                    )
                self.eval_losses[stage][name].update(losses[name].detach(), weight=has.sum())
        total = self.weighting.fixed_total(losses)  # the same scale under every strategy
        self.eval_totals[stage].update(total.detach(), weight=size)
        return outputs

    def _eval_epoch_end(self, stage: str) -> None:
        labeled = self.trainer.strategy.reduce(
            self._labeled[stage].to(self.device), reduce_op="sum"
        )
        checks = self._checks_stuck_heads(stage)
        scores, weights = [], []
        for i, (name, task) in enumerate(self.tasks.items()):
            collection = self.metrics[stage][name]
            if labeled[i] > 0:
                values = {**collection.compute(), "loss": self.eval_losses[stage][name].compute()}
                self.log_dict(
                    {f"{stage}/{name}/{k}": v for k, v in values.items()}, sync_dist=False
                )
                scores.append(task.score(values).to(self.device) * task.weight)
                weights.append(task.weight)
                if checks:
                    self._warn_if_stuck(task, values)
            collection.reset()
            self.eval_losses[stage][name].reset()
        self._stuck_checked |= checks
        self._labeled[stage].zero_()
        self.log(f"{stage}/loss", self.eval_totals[stage].compute(), prog_bar=stage == "val")
        score = torch.stack(scores).sum() / sum(weights) if scores else torch.zeros(())
        self.log(f"{stage}/score", score.float(), sync_dist=False, prog_bar=stage == "val")
        self.eval_totals[stage].reset()

    def _warn_if_stuck(self, task: Task, values: dict[str, torch.Tensor]) -> None:
        if task.name in self.health:
            values = {**values, **self.health[task.name].compute()}
            self.health[task.name].reset()
        hint = task.stuck_hint(values)
        if hint is not None:
            log.warning(
                f"task {task.name!r} after {self.current_epoch + 1} of "
                f"{self.trainer.max_epochs} epochs: {hint}"
            )

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # -- optimisation --------------------------------------------------------------------------
    def param_groups(self, lr: float, encoder_lr_mult: float) -> list[dict[str, Any]]:
        """Encoder and the rest as two groups: a pretrained encoder is usually fine-tuned at a
        lower rate (``optim.encoder_lr_mult``) than the freshly initialised decoder and heads."""
        encoder = {id(p) for p in self.net.encoder.parameters()}
        groups = [
            {
                "params": [p for p in self.parameters() if id(p) in encoder],
                "lr": lr * encoder_lr_mult,
            },
            {"params": [p for p in self.parameters() if id(p) not in encoder], "lr": lr},
        ]
        return [g for g in groups if g["params"]]

    def on_train_epoch_start(self) -> None:
        """``optim.freeze_encoder_epochs``: the first epochs train only decoder and heads on a
        frozen encoder (weights and BatchNorm statistics), so random heads do not wreck
        pretrained features before they produce useful gradients."""
        frozen = self.current_epoch < int(self.cfg.optim.freeze_encoder_epochs)
        self.net.encoder.requires_grad_(not frozen)
        if frozen:
            self.net.encoder.eval()

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = build_optimizer(self.param_groups(o.lr, float(o.encoder_lr_mult)), o)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(int(o.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1)), total - 1)
        sched = build_schedule(o.scheduler, opt, total, warmup)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before weighting strategies were separate classes hold every
        strategy's state (``weighting.dwa_weights`` under any strategy): drop what this one lacks."""
        own = set(self.weighting.state_dict())
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("weighting.")]:
            if key.removeprefix("weighting.") not in own:
                del state[key]
