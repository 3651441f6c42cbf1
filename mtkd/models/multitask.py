"""MultiTaskNet: one shared smp/timm encoder (random, local or pretrained weights: see
``mtkd.models.pretrained``), a shared U-Net decoder for dense tasks, one head per task. Dense
tasks read the decoder's full-resolution features; global tasks read one pooled vector (see
``MultiTaskNet.pooled``), after ``model.head_dropout``. The encoder's feature list holds one map
per stage, stage i at stride 2**i (i = 0: the image itself), for smp and timm encoders alike."""

from __future__ import annotations

import contextlib
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from mtkd.models.pretrained import (
    hub_offline_unless_reachable,
    is_online_name,
    load_encoder_weights,
    online_failure,
    smp_weights_argument,
)
from mtkd.tasks import Task


class MultiTaskNet(nn.Module):
    def __init__(self, tasks: dict[str, Task], model_cfg: Any) -> None:
        super().__init__()
        depth = int(model_cfg.encoder_depth)
        channels = list(model_cfg.decoder_channels)
        if len(channels) != depth:
            raise ValueError(
                f"model.decoder_channels has {len(channels)} entries but encoder_depth is {depth}; "
                "give one channel count per decoder stage"
            )
        encoder, weights = model_cfg.encoder, model_cfg.encoder_weights
        online = is_online_name(weights)
        try:
            with hub_offline_unless_reachable() if online else contextlib.nullcontext():
                unet = smp.Unet(
                    encoder_name=encoder,
                    encoder_weights=smp_weights_argument(encoder, weights) if online else None,
                    encoder_depth=depth,
                    decoder_channels=channels,
                    classes=1,
                )
        except (KeyError, ValueError, RuntimeError) as exc:
            if online and "weights" in str(exc).lower():
                raise online_failure(encoder, weights, exc) from None
            raise ValueError(
                f"model.encoder={encoder!r} cannot be built ({exc}). Use an smp encoder "
                "name (resnet18, resnet34, efficientnet-b0, ...) or any timm model as 'tu-<name>'."
            ) from None
        except OSError as exc:  # the hub is out of reach and nothing is cached
            raise online_failure(encoder, weights, exc) from None
        self.encoder = unet.encoder
        self.depth = depth
        if weights and not online:
            load_encoder_weights(self.encoder, encoder, weights)
        #: built whenever a task reads full-resolution features (segmentation, heatmap points)
        self.has_decoder = any(t.dense for t in tasks.values())
        self.decoder = unet.decoder if self.has_decoder else None
        pooled = self.encoder.out_channels[-1] + (2 * channels[-1] if self.has_decoder else 0)
        self.heads = nn.ModuleDict(
            {n: t.build_head(channels[-1] if t.dense else pooled) for n, t in tasks.items()}
        )
        self.dense_tasks = [n for n, t in tasks.items() if t.dense]
        #: length of the pooled vector (``forward_with_features``): a teacher embedding's size
        self.pooled_dim = pooled
        self.head_dropout = nn.Dropout(float(model_cfg.head_dropout))
        self.pooled_norm = PooledNorm(pooled) if model_cfg.get("pooled_norm") else None
        #: the layout the convolutions run in (``model.channels_last``); the network owns it, so
        #: training, evaluation, the report's timing and export all run the same layout
        self.memory_format = (
            torch.channels_last if model_cfg.get("channels_last") else torch.contiguous_format
        )
        self.to(memory_format=self.memory_format)

    @staticmethod
    def pooled(deepest: torch.Tensor, decoded: torch.Tensor | None) -> torch.Tensor:
        """The global tasks' input: the deepest encoder features averaged (the whole eye: disc,
        illumination), plus, with a decoder, its full-resolution features averaged and maxed. A
        few small lesions vanish in a 3x3 encoder map but not in the decoder's maximum, so DR
        grade and DME risk can read what the lesion segmentation sees. That part is detached:
        trained by the seven image-level losses too, the decoder's few channels served the dense
        tasks worse (teacher lesion dice 0, vessel dice 0.17 instead of 0.45)."""
        parts = [deepest.mean(dim=(2, 3))]
        if decoded is not None:
            decoded = decoded.detach()
            parts += [decoded.mean(dim=(2, 3)), decoded.amax(dim=(2, 3))]
        return torch.cat(parts, dim=1)

    def forward(
        self, image: torch.Tensor, guides: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return self.forward_with_features(image, guides=guides)[0]

    def map_channels(self, stride: int) -> int:
        """Channels of the encoder's feature map at ``stride`` (``forward_with_features``)."""
        return self.encoder.out_channels[map_stage(stride, self.depth)]

    def forward_with_features(
        self,
        image: torch.Tensor,
        map_stride: int | None = None,
        guides: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """The outputs, the global heads' input before dropout (B x ``pooled_dim``: the image
        embedding that feature-level KD matches, ``kd.features.weight``) and, given
        ``map_stride``, the encoder's feature map at that stride (B x ``map_channels`` x H/stride
        x W/stride: what dense feature KD matches, ``kd.features.map_weight``; the encoder
        computes it anyway, so asking for it costs nothing). ``guides``: per global task, what
        its head reads besides the features (``Task.guide``: teacher forcing)."""
        guides = guides or {}
        features = self.encoder(image.contiguous(memory_format=self.memory_format))
        decoded = self.decoder(features) if self.decoder is not None else None
        outputs = {n: self.heads[n](decoded) for n in self.dense_tasks}
        pooled = self.pooled(features[-1], decoded)
        if self.pooled_norm is not None:
            pooled = self.pooled_norm(pooled)
        dropped = self.head_dropout(pooled)
        for name, head in self.heads.items():
            if name in guides:
                outputs[name] = head(dropped, guides[name])
            elif name not in outputs:
                outputs[name] = head(dropped)
        if map_stride is None:
            return outputs, pooled, None
        return outputs, pooled, features[map_stage(map_stride, self.depth)]


def map_stage(stride: int, depth: int) -> int:
    """The encoder stage (index in its feature list) at ``stride``: a power of two from 2 to
    2**``depth`` (the deepest stage)."""
    stage = stride.bit_length() - 1
    if stride != 2**stage or not 1 <= stage <= depth:
        raise ValueError(
            f"kd.features.map_stride={stride}: an encoder of depth {depth} has feature maps at "
            f"strides {[2**i for i in range(1, depth + 1)]}; pick one of them"
        )
    return stage


class PooledNorm(nn.Module):
    """BatchNorm of the pooled features, passing the gradient straight through.

    Mean-pooled activations are positive and nearly alike across images, so a linear head on
    them saw mostly a constant: its logits moved like a bias, and a random-init student's heads
    stayed at the class prior for whole runs (the demo's KD student: glaucoma, val kappa 0).
    Standardised, what differs between images is what the heads see. Backward, the encoder gets
    the gradient it would get without the norm: through 1 / std, the global heads' gradient
    swamped the dense tasks' (the no-KD student's lesion Dice fell from 0.07 to 0 in 3 of 3
    seeds). A training batch of one sample (an epoch's odd last one) uses the running
    statistics. The BatchNorm is a child module, so ``trainer.sync_batchnorm`` syncs its
    statistics and keeps the straight-through path."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        free, norm = x.detach(), self.norm
        if self.training and x.shape[0] == 1:
            standardised = F.batch_norm(
                free,
                norm.running_mean,
                norm.running_var,
                norm.weight,
                norm.bias,
                False,
                0.0,
                norm.eps,
            )
        else:
            standardised = norm(free)
        return standardised + (x - free)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
