"""A task-weighting strategy defined outside the library: balance the tasks by the scale of
their losses. Import it through ``plugins=[weighting]`` (this folder on PYTHONPATH) and pick it
with ``run.weighting=loss_balance``; to evaluate or export its checkpoints in a fresh process,
name it: ``MTKD_PLUGINS=weighting mtkd evaluate ckpt=...``. tests/test_weighting_plugin.py trains
with it."""

from __future__ import annotations

import torch

from mtkd.modules.weighting import Weighting, register_weighting


@register_weighting("loss_balance")
class LossBalance(Weighting):
    """``L = sum_t w_t b_t L_t`` with ``b_t = K (1 / m_t) / sum_u (1 / m_u)``, ``m_t`` task t's
    mean training loss of the last epoch (1 before the first epoch ends), K tasks: a task whose
    loss is on a large scale (a segmentation Dice + BCE next to an MAE) does not drown the others."""

    needs_epoch_means = True

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__(weights)
        self.register_buffer("balance", torch.ones(len(self.names)))

    def term(self, index: int, loss: torch.Tensor) -> torch.Tensor:
        return self.balance[index] * loss

    def scales(self) -> torch.Tensor:
        return self.balance

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        inverse = [
            1.0 / epoch_losses[n] if epoch_losses.get(n, 0.0) > 0 else 0.0 for n in self.names
        ]
        if sum(inverse) > 0:
            k = len(self.names)
            self.balance.copy_(torch.tensor([k * v / sum(inverse) for v in inverse]))
