"""A learning-rate schedule defined outside the library: step decay at fractions of training,
with options. Import it through ``plugins=[schedule]`` (this folder on PYTHONPATH) and pick it
with its options: ``"optim.scheduler={name: step, milestones: [0.5, 0.75], gamma: 0.1}"``.
tests/test_schedule_plugin.py checks its rates and option errors; tests/test_logger_plugin.py
trains with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mtkd.modules.optim import register_schedule


@register_schedule("step")
def step(
    total: int, warmup: int, milestones: Sequence[float], gamma: float = 0.1
) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then ``gamma ** k`` after the k-th milestone, each
    a fraction of the ``total`` steps (the library passes ``total`` and ``warmup``; the config
    gives ``milestones`` and, optionally, ``gamma``)."""
    bounds = sorted(round(fraction * total) for fraction in milestones)

    def multiplier(at: int) -> float:
        if at < warmup:
            return (at + 1) / (warmup + 1)
        return gamma ** sum(at >= bound for bound in bounds)

    return multiplier
