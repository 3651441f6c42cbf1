"""PooledNorm: the global heads see standardised pooled features, also for a one-sample batch;
networks built without it keep the parameter names of older checkpoints."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mtkd.models.multitask import MultiTaskNet, PooledNorm
from mtkd.run_config import load_config
from mtkd.tasks import build_tasks

pytestmark = pytest.mark.unit


def test_pooled_features_sharing_a_large_offset_come_out_standardised() -> None:
    gen = torch.Generator().manual_seed(0)
    pooled = 5.0 + 0.1 * torch.randn(32, 6, generator=gen)  # what differs is small
    out = PooledNorm(6).train()(pooled)
    assert out.mean(dim=0).abs().max() < 1e-4
    assert (out.std(dim=0, unbiased=False) - 1).abs().max() < 1e-2


def test_a_one_sample_training_batch_uses_the_running_statistics() -> None:
    norm = PooledNorm(3).train()
    norm(torch.randn(8, 3) * 2 + 5)  # running statistics move towards mean 5, var 4
    before = (norm.norm.running_mean.clone(), norm.norm.running_var.clone())
    one = torch.tensor([[5.0, 5.0, 5.0]])
    out = norm(one)
    expected = (one - before[0]) / torch.sqrt(before[1] + norm.norm.eps)
    assert torch.allclose(out, expected, atol=1e-6)
    stats = norm.norm
    assert torch.equal(stats.running_mean, before[0]) and torch.equal(stats.running_var, before[1])


def test_the_student_config_turns_it_on_and_older_configs_build_without_it() -> None:
    cfg = load_config("distill")
    tasks = build_tasks(OmegaConf.to_container(cfg.tasks))
    assert cfg.model.pooled_norm is True
    assert isinstance(MultiTaskNet(tasks, cfg.model).pooled_norm, PooledNorm)
    older = OmegaConf.to_container(cfg.model)
    del older["pooled_norm"]  # a checkpoint's saved model config from before the option
    net = MultiTaskNet(tasks, OmegaConf.create(older))
    assert net.pooled_norm is None
    assert not any(k.startswith("pooled_norm") for k in net.state_dict())


def test_the_encoder_gets_the_gradient_it_would_get_without_the_norm() -> None:
    """Straight through: d(out)/d(x) is the identity, so the 1 / std of nearly constant features
    does not amplify the global heads' gradient into the shared encoder."""
    x = (5.0 + 0.01 * torch.randn(16, 4)).requires_grad_()
    weights = torch.randn(16, 4)
    norm = PooledNorm(4).train()
    (norm(x) * weights).sum().backward()
    assert torch.allclose(x.grad, weights)
    assert norm.norm.weight.grad.abs().sum() > 0  # its affine part still learns


def test_sync_batchnorm_syncs_the_statistics_and_keeps_the_straight_through_path() -> None:
    from timm.layers import convert_sync_batchnorm

    converted = convert_sync_batchnorm(nn.Sequential(PooledNorm(4)))
    assert isinstance(converted[0], PooledNorm)
    assert isinstance(converted[0].norm, nn.SyncBatchNorm)
