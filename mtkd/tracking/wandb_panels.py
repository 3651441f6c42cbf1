"""W&B pictures each validation epoch: a fixed panel of validation images with each task's
predicted vs true overlay (``Task.overlay``: masks, points) and caption (``Task.caption``), and a
confusion matrix per ``single_class`` task.

Cheap by design: the panel costs one extra forward on a few images; the confusion matrices reuse
the validation forward passes through a hook. Under DDP they cover rank 0's share of the
validation set, and nothing runs on other ranks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import wandb
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from mtkd.tasks import Overlay, Task

#: half the side of the box drawn around a landmark, as a fraction of the image side
POINT_BOX = 0.03


def label_map(planes: np.ndarray | torch.Tensor) -> np.ndarray:
    """C x H x W probabilities or boolean masks -> one H x W class map for a W&B overlay:
    0 = none, c + 1 = class c; later classes are drawn over earlier ones (cup over disc)."""
    planes = np.asarray(planes, dtype=np.float32)
    out = np.zeros(planes.shape[-2:], dtype=np.uint8)
    for c, plane in enumerate(planes > 0.5):
        out[plane] = c + 1
    return out


def point_boxes(points: dict[str, tuple[float, float]], label: str) -> list[dict[str, Any]]:
    """Named normalised (x, y) points -> W&B boxes (relative coordinates) centred on them."""
    return [
        {
            "position": {
                "middle": [float(x), float(y)],
                "width": 2 * POINT_BOX,
                "height": 2 * POINT_BOX,
            },
            "class_id": k,
            "box_caption": f"{name} {label}",
        }
        for k, (name, (x, y)) in enumerate(points.items())
    ]


def overlay_layers(
    name: str, drawn: dict[str, Overlay]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """One task's overlays (``{"predicted": ..., "true": ...}``) -> W&B masks and boxes."""
    masks, boxes = {}, {}
    for role, layer in drawn.items():
        if layer.masks:
            masks[f"{name} {role}"] = {
                "mask_data": label_map(np.stack(list(layer.masks.values()))),
                "class_labels": {c + 1: n for c, n in enumerate(layer.masks)},
            }
        if layer.points:
            boxes[f"{name} {role}"] = {
                "box_data": point_boxes(layer.points, role),
                "class_labels": dict(enumerate(layer.points)),
            }
    return masks, boxes


class ValidationPanels(Callback):
    """Logs ``val/panel`` (the first ``n_images`` validation images, fixed across epochs) and
    ``val/<task>/confusion_matrix`` each validation epoch, sanity check excluded."""

    def __init__(self, cfg: DictConfig, logger: WandbLogger, n_images: int = 4) -> None:
        self.mean = torch.tensor(list(cfg.data.mean)).view(3, 1, 1)
        self.std = torch.tensor(list(cfg.data.std)).view(3, 1, 1)
        self.logger = logger
        self.n_images = n_images
        self._items: list[dict[str, Any]] | None = None
        self._hook: Any = None
        self._last: dict[str, torch.Tensor] | None = None
        self._labels: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    # -- confusion matrices from the validation forward passes -----------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        self._labels = {n: ([], []) for n, t in pl_module.tasks.items() if t.single_class}
        self._hook = pl_module.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: Any, output: dict) -> None:
        self._last = output

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._hook is None or self._last is None:
            return
        for name, (preds, trues) in self._labels.items():
            has = batch["has"][name]
            task = pl_module.tasks[name]
            preds.append(task.predicted_class(self._last[name][has]).cpu())
            trues.append(batch["targets"][name][has].cpu())
        self._last = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        logs: dict[str, Any] = {"val/panel": self.panel(trainer, pl_module)}
        for name, (preds, trues) in self._labels.items():
            if preds and sum(len(p) for p in preds):
                task = pl_module.tasks[name]
                logs[f"val/{name}/confusion_matrix"] = wandb.plot.confusion_matrix(
                    y_true=torch.cat(trues).tolist(),
                    preds=torch.cat(preds).tolist(),
                    class_names=task.channel_names(),
                    title=f"{name} (epoch {trainer.current_epoch})",
                )
        self.logger.log_metrics(logs, step=trainer.global_step)

    # -- the image panel -----------------------------------------------------------------------
    def panel(self, trainer: Trainer, pl_module: LightningModule) -> list[wandb.Image]:
        """Predictions on the fixed validation images, one W&B image each."""
        if self._items is None:
            dataset = trainer.val_dataloaders.dataset
            self._items = [dataset[i] for i in range(min(self.n_images, len(dataset)))]
        precision = trainer.precision_plugin
        image = precision.convert_input(torch.stack([it["image"] for it in self._items]))
        with torch.no_grad(), precision.val_step_context():
            raw = pl_module(image.to(pl_module.device))
        tasks = pl_module.tasks
        values = {n: t.activate(raw[n]).cpu() for n, t in tasks.items()}
        return [self.image(i, item, values, tasks) for i, item in enumerate(self._items)]

    def image(
        self, i: int, item: dict[str, Any], values: dict[str, torch.Tensor], tasks: dict[str, Task]
    ) -> wandb.Image:
        """Sample ``i`` from activated outputs (``Task.activate``): each task's overlay
        (predicted, and true when labeled) over the image, its caption under it."""
        masks, boxes, caption = {}, {}, [item["sample_id"]]
        for name, task in tasks.items():
            pred = values[name][i]
            true = item["targets"][name] if bool(item["has"][name]) else None
            drawn = {"predicted": task.overlay(pred)}
            if true is not None:
                drawn["true"] = task.overlay(true)
            task_masks, task_boxes = overlay_layers(name, drawn)
            masks.update(task_masks)
            boxes.update(task_boxes)
            text = task.caption(pred, true)
            if text:
                caption.append(f"{name} {text}")
        pixels = (item["image"].float() * self.std + self.mean).clamp(0, 1)
        return wandb.Image(
            (pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8),
            masks=masks or None,
            boxes=boxes or None,
            caption="; ".join(caption),
        )
