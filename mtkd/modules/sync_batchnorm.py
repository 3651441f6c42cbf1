"""``trainer.sync_batchnorm`` for timm networks: the Lightning layer-sync plugin that
``mtkd.stages.make_trainer`` hands the Trainer in place of Lightning's own."""

from __future__ import annotations

from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn


class TimmSyncBatchNorm(TorchSyncBatchNorm):
    """``trainer.sync_batchnorm`` with timm's converter. torch's ``convert_sync_batchnorm``, which
    Lightning uses, turns timm ``BatchNormAct2d`` (norm + activation, the student's MobileNetV3)
    into a plain SyncBatchNorm and silently drops the activation."""

    def apply(self, model: nn.Module) -> nn.Module:
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        from timm.layers import BatchNormAct2d, SyncBatchNormAct

        def back(module: nn.Module) -> nn.Module:
            out = module
            if isinstance(module, SyncBatchNormAct):
                out = BatchNormAct2d(
                    module.num_features,
                    eps=module.eps,
                    momentum=module.momentum,
                    affine=module.affine,
                    track_running_stats=module.track_running_stats,
                )
                if module.affine:
                    out.weight, out.bias = module.weight, module.bias
                out.running_mean, out.running_var = module.running_mean, module.running_var
                out.num_batches_tracked = module.num_batches_tracked
                out.train(module.training)
            elif isinstance(module, nn.SyncBatchNorm):
                return super(TimmSyncBatchNorm, self).revert(module)
            for name, child in module.named_children():
                out.add_module(name, back(child))
            return out

        return back(model)
