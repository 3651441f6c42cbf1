"""Pretrained encoders: packaged ImageNet weights really load (every tensor, right classes on
known photos), partial or online-only weights fail clearly, the input normalisation follows the
weights and reaches the teacher, and the fine-tuning options act."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mtkd.config import to_container
from mtkd.kd.ensemble import Renormalise
from mtkd.models import pretrained
from mtkd.models.multitask import MultiTaskNet, count_parameters
from mtkd.models.pretrained import (
    IMAGENET_MEAN,
    lukemelas_to_timm,
    packaged_weights,
    pretrained_normalisation,
    read_state,
)
from mtkd.modules.teacher import TeacherModule
from mtkd.run_config import load_config
from mtkd.tasks import build_tasks

TASKS = build_tasks({"grade": {"kind": "classification", "num_classes": 3}})


def model_cfg(encoder: str, weights: str | None) -> OmegaConf:
    return OmegaConf.create(
        {
            "encoder": encoder,
            "encoder_weights": weights,
            "encoder_depth": 5,
            "decoder_channels": [32, 16, 16, 8, 8],
            "head_dropout": 0.0,
        }
    )


@pytest.mark.unit
@pytest.mark.parametrize("encoder", ["timm-tf_efficientnet_lite0", "tu-tf_efficientnet_lite0"])
def test_packaged_weights_fill_every_encoder_tensor(encoder):
    net = MultiTaskNet(TASKS, model_cfg(encoder, "packaged"))
    mapped = lukemelas_to_timm(
        read_state(packaged_weights(encoder).path()), "tf_efficientnet_lite0"
    )
    prefix = "model." if encoder.startswith("tu-") else ""
    own = net.encoder.state_dict()
    assert len(own) > 250
    for key, value in own.items():
        assert torch.equal(value, mapped[key.removeprefix(prefix)]), key


def imagenet_top5(photo: np.ndarray) -> list[int]:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(
        lukemelas_to_timm(
            read_state(packaged_weights("tf_efficientnet_lite0").path()), "tf_efficientnet_lite0"
        )
    )
    mean, std = pretrained_normalisation("tu-tf_efficientnet_lite0", "packaged")
    x = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BICUBIC), np.float32) / 255
    x = (torch.from_numpy(x).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(
        std
    )[:, None, None]
    with torch.no_grad():
        return model(x[None])[0].topk(5).indices.tolist()


@pytest.mark.unit
def test_packaged_lite0_recognises_imagenet_photos():
    from skimage import data

    cats = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert imagenet_top5(data.chelsea())[0] in cats
    assert imagenet_top5(data.coffee())[0] == 967  # espresso


@pytest.mark.unit
def test_partial_weights_file_is_an_error_listing_missing_keys(tmp_path):
    net = MultiTaskNet(TASKS, model_cfg("resnet18", None))
    state = net.encoder.state_dict()
    del state["layer4.1.bn2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 of \d+ tensors missing.*layer4.1.bn2.weight"):
        MultiTaskNet(TASKS, model_cfg("resnet18", str(path)))


@pytest.mark.unit
def test_full_weights_file_loads_and_extra_tensors_are_ignored(tmp_path):
    source = MultiTaskNet(TASKS, model_cfg("resnet18", None))
    state = {f"encoder.{k}": v for k, v in source.encoder.state_dict().items()}
    state["fc.weight"] = torch.zeros(10, 512)  # a classifier head the encoder does not have
    path = tmp_path / "full.pth"
    torch.save({"state_dict": state}, path)
    net = MultiTaskNet(TASKS, model_cfg("resnet18", str(path)))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(value, net.encoder.state_dict()[key])


@pytest.mark.unit
def test_packaged_for_an_encoder_without_packaged_weights_names_the_ones_that_have():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        MultiTaskNet(TASKS, model_cfg("resnet18", "packaged"))


@pytest.mark.unit
def test_online_name_offline_fails_fast_naming_the_offline_alternatives(monkeypatch):
    monkeypatch.setattr(pretrained, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(ValueError, match="need the internet.*'packaged'.*local state-dict"):
        MultiTaskNet(TASKS, model_cfg("tu-tf_efficientnet_lite0", "imagenet"))


@pytest.mark.unit
def test_online_name_for_an_smp_encoder_fails_fast_at_config_time(monkeypatch):
    """The normalisation of smp's named weights is read from the hub: offline, the config must
    fail at once with the offline alternatives, not retry for half a minute."""
    monkeypatch.setattr(pretrained, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(ValueError, match="need the internet.*'packaged'"):
        load_config("teacher", ["model.encoder_weights=imagenet"])


@pytest.mark.unit
def test_normalisation_follows_the_weights_unless_the_data_config_sets_it():
    packaged = load_config(
        "teacher", ["model.encoder=tu-tf_efficientnet_lite0", "model.encoder_weights=packaged"]
    )
    assert list(packaged.data.mean) == [0.5, 0.5, 0.5] and list(packaged.data.std) == [0.5] * 3
    random = load_config("teacher", [])
    assert tuple(random.data.mean) == IMAGENET_MEAN
    explicit = load_config(
        "teacher",
        [
            "model.encoder_weights=packaged",
            "model.encoder=tu-efficientnet_lite0",
            "data.mean=[0.1,0.2,0.3]",
        ],
    )
    assert list(explicit.data.mean) == [0.1, 0.2, 0.3] and list(explicit.data.std) == [0.5] * 3


@pytest.mark.unit
def test_renormalise_gives_a_teacher_its_own_normalisation():
    pixels = torch.rand(2, 3, 4, 4)
    student_norm = (IMAGENET_MEAN, (0.229, 0.224, 0.225))
    teacher_norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    as_student = (pixels - torch.tensor(student_norm[0]).view(3, 1, 1)) / torch.tensor(
        student_norm[1]
    ).view(3, 1, 1)
    converted = Renormalise(student_norm, teacher_norm)(as_student)
    assert torch.allclose(converted, pixels * 2 - 1, atol=1e-6)
    assert Renormalise(teacher_norm, teacher_norm).identity


@pytest.mark.unit
def test_encoder_lr_mult_gives_the_encoder_its_own_rate(tiny):
    cfg = load_config("teacher", tiny(**{"optim.encoder_lr_mult": 0.1, "optim.lr": 0.01}))
    module = TeacherModule(to_container(cfg))
    groups = module.param_groups(0.01, 0.1)
    encoder = {id(p) for p in module.net.encoder.parameters()}
    assert groups[0]["lr"] == pytest.approx(0.001) and groups[1]["lr"] == pytest.approx(0.01)
    assert {id(p) for p in groups[0]["params"]} == encoder
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))


@pytest.mark.integration
def test_frozen_encoder_epochs_leave_weights_and_batchnorm_statistics_untouched(tiny):
    from mtkd.stages import fit

    cfg = load_config("teacher", tiny(**{"optim.freeze_encoder_epochs": 1}))
    torch.manual_seed(0)
    before = TeacherModule(to_container(cfg)).net.state_dict()
    best = fit(cfg)
    after = {
        k.removeprefix("net."): v
        for k, v in torch.load(best, map_location="cpu", weights_only=True)["state_dict"].items()
    }
    encoder = [k for k in before if k.startswith("encoder.")]
    rest = [k for k in before if not k.startswith("encoder.") and before[k].is_floating_point()]
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in rest)


@pytest.mark.integration
def test_a_checkpoint_is_rebuilt_without_fetching_its_pretrained_weights_again(tiny, monkeypatch):
    """The checkpoint's own weights replace the encoder's: evaluating or exporting it must not
    need the weights package (or, for ``imagenet``, the internet) again."""
    from mtkd.models import multitask
    from mtkd.modules.checkpoint import load_net
    from mtkd.stages import evaluate, fit

    overrides = tiny(
        **{"model.encoder": "tu-tf_efficientnet_lite0", "model.encoder_weights": "packaged"}
    )
    best = fit(load_config("teacher", overrides))

    def unavailable(*args, **kwargs):
        raise AssertionError("pretrained weights fetched again for a checkpoint")

    monkeypatch.setattr(multitask, "load_encoder_weights", unavailable)
    net, _, cfg = load_net(best)
    assert cfg.model.encoder_weights == "packaged"  # the saved config still says where from
    metrics = evaluate(str(best), "test", [], bootstrap=0)
    assert "test/dr_grade/kappa" in metrics


@pytest.mark.unit
def test_student_pretrained_builds_offline_from_packaged_lite0_at_half_the_teachers_size(
    monkeypatch,
):
    """model=student_pretrained: every encoder tensor from the packaged ImageNet file (none
    random, nothing fetched), 3.0-4.5 M parameters on the synthetic tasks, and at least 1.5x
    smaller than model=teacher_pretrained on the same tasks."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("model=student_pretrained tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = load_config("distill", ["model=student_pretrained"])
    tasks = build_tasks(to_container(cfg)["tasks"])
    student = MultiTaskNet(tasks, cfg.model)
    packaged = lukemelas_to_timm(
        read_state(packaged_weights(cfg.model.encoder).path()), "tf_efficientnet_lite0"
    )
    for key, value in student.encoder.state_dict().items():
        assert torch.equal(value, packaged[key]), key
    # The teacher's size does not depend on its weights: counted on a random encoder.
    teacher_cfg = load_config("teacher", ["model=teacher_pretrained", "model.encoder_weights=null"])
    teacher = MultiTaskNet(build_tasks(to_container(teacher_cfg)["tasks"]), teacher_cfg.model)
    params = count_parameters(student)
    assert 3.0e6 <= params <= 4.5e6
    assert params < count_parameters(teacher) / 1.5
