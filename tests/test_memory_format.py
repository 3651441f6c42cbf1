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


def nets(size: int = 64) -> tuple[MultiTaskNet, MultiTaskNet]:
    """The default student and a contiguous twin holding the same weights."""
    cfg = load_config("distill")
    tasks = build_tasks(OmegaConf.to_container(cfg.tasks))
    torch.manual_seed(0)
    default = MultiTaskNet(tasks, cfg.model).eval()
    twin = MultiTaskNet(tasks, OmegaConf.merge(cfg.model, {"channels_last": False})).eval()
    twin.load_state_dict(default.state_dict())
    return default, twin


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
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = default(image), twin(image)
    for name, out in ours.items():
        assert torch.allclose(out, theirs[name], atol=1e-5), name
    # A checkpoint written in one layout loads into the other with equal values.
    contiguous_again = nets()[1]
    contiguous_again.load_state_dict(default.state_dict())
    for key, tensor in contiguous_again.state_dict().items():
        assert torch.equal(tensor, twin.state_dict()[key]), key
