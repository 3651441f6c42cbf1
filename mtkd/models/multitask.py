"""MultiTaskNet: one shared smp/timm encoder, a shared U-Net decoder for dense tasks, one head
per task. Dense tasks read the decoder's full-resolution features; global tasks read one pooled
vector (see ``MultiTaskNet.pooled``), after ``model.head_dropout``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from mtkd.tasks import Task


def load_encoder_weights(encoder: nn.Module, path: str) -> None:
    """Load encoder weights from a local file (state dict, optionally under "state_dict" and/or
    with an "encoder." prefix). Nothing is fetched from the network."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"model.encoder_weights={path!r} is not a file. Pretrained weights are never "
            "downloaded: pass a local .pth/.pt state dict, or null for random initialisation."
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    own = encoder.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(
            f"{path}: no tensor matches the encoder's parameters (wrong architecture?)"
        )
    encoder.load_state_dict(matched, strict=False)


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
        try:
            unet = smp.Unet(
                encoder_name=model_cfg.encoder,
                encoder_weights=None,
                encoder_depth=depth,
                decoder_channels=channels,
                classes=1,
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"model.encoder={model_cfg.encoder!r} cannot be built ({exc}). Use an smp encoder "
                "name (resnet18, resnet34, efficientnet-b0, ...) or any timm model as 'tu-<name>'."
            ) from None
        self.encoder = unet.encoder
        if model_cfg.encoder_weights:
            load_encoder_weights(self.encoder, model_cfg.encoder_weights)
        self.has_dense = any(t.dense for t in tasks.values())
        self.decoder = unet.decoder if self.has_dense else None
        pooled = self.encoder.out_channels[-1] + (2 * channels[-1] if self.has_dense else 0)
        self.heads = nn.ModuleDict(
            {n: t.build_head(channels[-1] if t.dense else pooled) for n, t in tasks.items()}
        )
        self.dense_tasks = [n for n, t in tasks.items() if t.dense]
        self.stride = 2**depth
        self.head_dropout = nn.Dropout(float(model_cfg.head_dropout))

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

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(image)
        decoded = self.decoder(features) if self.decoder is not None else None
        outputs = {n: self.heads[n](decoded) for n in self.dense_tasks}
        pooled = self.head_dropout(self.pooled(features[-1], decoded))
        for name, head in self.heads.items():
            if name not in outputs:
                outputs[name] = head(pooled)
        return outputs


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
