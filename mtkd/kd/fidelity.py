"""How much of a teacher's dense maps survives the cache's resolution.

A map stored smaller than the working size is averaged down when cached and brought back up when
read; a structure thinner than a cache pixel (a vessel, a microaneurysm) fades below 0.5 on the
way and the student is taught it is absent. ``cache-teacher`` measures this on every map it
writes and warns where the cache resolution loses structure.
"""

from __future__ import annotations

import numpy as np
import torch

from mtkd.status import status_logger
from mtkd.tasks import Task

log = status_logger(__name__)

#: a cached map whose Dice (both thresholded at 0.5) with the teacher's map is below this makes
#: cache-teacher warn
KEPT_DICE_WARNING = 0.9


class MapFidelity:
    """Per task and channel, true-positive, false-positive and false-negative pixel counts of
    the cached maps (decoded and resized back, as the loader does) against the teacher's maps,
    both thresholded at 0.5."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def update(self, name: str, task: Task, output: torch.Tensor, stored: np.ndarray) -> None:
        """Count one batch; outputs stored at their own size (logits, points, full-size maps)
        lose nothing to resolution and are skipped."""
        size = tuple(output.shape[-2:])
        if output.dim() != 4 or tuple(stored.shape[-2:]) == size:
            return
        back = task.teacher_at(torch.from_numpy(task.decode_cache(stored)), size)
        teacher, cached = output.detach().float().cpu() > 0.5, back > 0.5
        dims = (0, 2, 3)
        batch = torch.stack(
            [
                (teacher & cached).sum(dims),
                (teacher & ~cached).sum(dims),
                (~teacher & cached).sum(dims),
            ]
        ).double()
        self.counts[name] = self.counts.get(name, 0) + batch
        self.sizes[name] = (int(stored.shape[-1]), size[-1])

    def kept_dice(self) -> dict[str, dict[int, float]]:
        """Per task, channel index -> Dice of cached vs teacher maps; channels where neither
        has a pixel above 0.5 are left out (nothing to lose)."""
        out = {}
        for name, (tp, fp, fn) in self.counts.items():
            den = 2 * tp + fp + fn
            out[name] = {c: float(2 * tp[c] / den[c]) for c in range(len(tp)) if den[c] > 0}
        return out

    def report(self, tasks: dict[str, Task]) -> None:
        """Log what each reduced map keeps; warn, with the setting that fixes it, where a
        channel keeps less than ``KEPT_DICE_WARNING``."""
        for name, dice in self.kept_dice().items():
            if not dice:
                continue
            stored, working = self.sizes[name]
            channels = tasks[name].channel_names()
            worst = min(dice, key=dice.get)
            kept = ", ".join(f"{channels[c]} {d:.2f}" for c, d in dice.items())
            if dice[worst] < KEPT_DICE_WARNING:
                log.warning(
                    f"cache-teacher: {name} maps stored at {stored} px keep {channels[worst]} at "
                    f"Dice {dice[worst]:.2f} of the teacher's {working} px maps ({kept}): its "
                    f"structures are thinner than a cache pixel and the student would learn they "
                    f"are absent. Store them at the working size: cache.task_dense_size.{name}="
                    f"{working} (or cache.dense_size=null for every task)"
                )
            else:
                log.info(
                    f"{name} maps stored at {stored} px keep Dice {kept} of the teacher's "
                    f"{working} px maps"
                )
