"""A KD loss defined outside the library: reverse KL for classification tasks. Import it through
``plugins=[kd_loss]`` (this folder on PYTHONPATH) and pick it per task:
``kd.tasks.dr_grade.loss=reverse_kl``. tests/test_extending.py distils with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkd.tasks import Task, register_kd_loss


@register_kd_loss("classification", "reverse_kl")
def reverse_kl(
    task: Task, pred: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(p_s || p_t) = T^2 * sum_c p_s,c (log p_s,c - log p_t,c), p = softmax(z / T):
    mode-seeking (the student commits to the teacher's main class) where the default ``kl`` is
    mean-seeking."""
    log_p_student = F.log_softmax(pred / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(dim=1)
    return kl * temperature**2
