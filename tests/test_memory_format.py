"""model.channels_last: the network runs its convolutions in channels-last layout by default, and
the layout changes the speed, never the outputs or the checkpoint's tensors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mtkd.models.multitask import MultiTaskNet
from mtkd.run_config import load_config
from mtkd.tasks import build_tasks

pytestmark = pytest.mark.unit

CHANNELS_LAST = torch.channels_last


def net(seed: int, channels_last: bool | None = None) -> MultiTaskNet:
    """The default student initialised from ``seed``; ``channels_last`` overrides its layout."""
    cfg = load_config("distill")
    model = (
        cfg.model
        if channels_last is None
        else OmegaConf.merge(cfg.model, {"channels_last": channels_last})
    )
    torch.manual_seed(seed)
    return MultiTaskNet(build_tasks(OmegaConf.to_container(cfg.tasks)), model).eval()


def nets() -> tuple[MultiTaskNet, MultiTaskNet]:
    """The default student and a contiguous twin, each initialised from the same seed."""
    return net(0), net(0, channels_last=False)


def test_the_default_network_holds_and_computes_channels_last_maps() -> None:
    default, twin = nets()
    convs = [m.weight for m in default.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=CHANNELS_LAST) for w in convs)
    image = torch.randn(2, 3, 64, 64)  # a plain NCHW batch, as the loaders give
    with torch.no_grad():
        _, _, feature_map = default.forward_with_features(image, map_stride=16)
        _, _, twin_map = twin.forward_with_features(image, map_stride=16)
    assert feature_map.is_contiguous(memory_format=CHANNELS_LAST)
    assert twin_map.is_contiguous()


def test_the_layout_leaves_outputs_and_saved_tensors_as_they_are() -> None:
    default, twin = nets()
    for key, tensor in default.state_dict().items():  # the same values, only laid out otherwise
        assert torch.equal(tensor, twin.state_dict()[key]), key
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = default(image), twin(image)
    for name, out in ours.items():
        assert torch.allclose(out, theirs[name], atol=1e-5), name
    # A checkpoint written in one layout loads into the other: a contiguous net of other weights
    # that loads the channels-last one's state computes its outputs.
    other = net(1, channels_last=False)
    other.load_state_dict(default.state_dict())
    with torch.no_grad():
        loaded = other(image)
    for name, out in ours.items():
        assert torch.allclose(out, loaded[name], atol=1e-5), name
