"""``trainer.sync_batchnorm``'s layer sync (mtkd.modules.sync_batchnorm.TimmSyncBatchNorm):
apply turns every BatchNorm, timm's norm + activation layers included, into its synchronised
variant, and revert turns them back with the same types, activations, hyper-parameters, weights
and running statistics, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mtkd.modules.sync_batchnorm import TimmSyncBatchNorm


def small_net() -> nn.Sequential:
    """A plain BatchNorm2d and three timm BatchNormAct2d: custom eps/momentum with a Hardswish,
    one without affine parameters, one in eval mode, nested in a child module."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, eps=1e-3, momentum=0.3),
        BatchNormAct2d(8, eps=2e-3, momentum=0.05, act_layer=nn.Hardswish),
        nn.Sequential(nn.Conv2d(8, 4, 1), BatchNormAct2d(4, affine=False, act_layer=nn.ReLU)),
        BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=nn.Dropout),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.uniform_(-1, 1, generator=generator)
                module.running_var.uniform_(0.5, 2, generator=generator)
                module.num_batches_tracked.fill_(7)
                if module.affine:
                    module.weight.uniform_(0.5, 1.5, generator=generator)
                    module.bias.uniform_(-1, 1, generator=generator)
    net[4].eval()
    return net


def norms(net: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in net.named_modules() if isinstance(m, _BatchNorm)}


@pytest.mark.unit
def test_apply_then_revert_restores_types_activations_weights_and_statistics_exactly() -> None:
    original = small_net()
    layer_sync = TimmSyncBatchNorm()
    synced = layer_sync.apply(copy.deepcopy(original))
    assert {name: type(m) for name, m in norms(synced).items()} == {
        "1": nn.SyncBatchNorm,
        "2": SyncBatchNormAct,
        "3.1": SyncBatchNormAct,
        "4": SyncBatchNormAct,
    }
    with torch.no_grad():  # as if trained under DDP: the synced layers' state moves on
        for module in norms(synced).values():
            module.running_mean.add_(0.25)
            module.num_batches_tracked.add_(3)
    expected = {k: v.clone() for k, v in synced.state_dict().items()}

    reverted = layer_sync.revert(synced)
    got = norms(reverted)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in reverted.modules())
    # Lightning's own revert gives plain BatchNorm a generic _BatchNormXd; timm's layers must
    # come back as BatchNormAct2d, else their activation is lost.
    assert not isinstance(got["1"], BatchNormAct2d)
    assert [type(got[n]) for n in ("2", "3.1", "4")] == [BatchNormAct2d] * 3
    for name in ("2", "3.1", "4"):
        before, after = norms(original)[name], got[name]
        assert type(after.act) is type(before.act) and type(after.drop) is type(before.drop), name
        assert after.training == before.training, name
    for name, before in norms(original).items():
        after = got[name]
        assert (after.eps, after.momentum, after.affine, after.track_running_stats) == (
            before.eps,
            before.momentum,
            before.affine,
            before.track_running_stats,
        ), name
    state = reverted.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert int(got["3.1"].num_batches_tracked) == 10

    # The same function as the original network with the same state, in eval mode.
    original.load_state_dict(expected)
    image = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reverted.eval()(image), original.eval()(image), rtol=0, atol=0)
