"""Feature-level KD (``kd.features``) on the global embedding and on the stride-16 feature map:
the loss on known vectors and maps, the teacher features cache-teacher stores, the maps following
the image's augmentation, and distill runs that train the adaptors with them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_modules.datamodule import FundusDataModule
from mtkd.config import ConfigError
from mtkd.kd.cache import TeacherCache, feature_map_name
from mtkd.kd.ensemble import TeacherEnsemble
from mtkd.models.multitask import count_parameters
from mtkd.modules.checkpoint import load_net
from mtkd.modules.student import StudentModule, feature_kd_loss
from mtkd.run_config import load_config
from mtkd.stages import build_run, cache_teacher, fit, make_trainer, open_checked_cache
from tests.conftest import distill_cfg, tiny_overrides


def test_loss_is_the_squared_distance_of_the_unit_vectors():
    # 60 degrees apart: |u - v|^2 = 2 - 2 cos 60 = 1, whatever the lengths; 90 degrees: 2.
    adapted = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    teacher = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)], [7.0, 0.0]])
    assert feature_kd_loss(adapted, teacher).tolist() == pytest.approx([1.0, 2.0])


def test_loss_is_zero_for_a_positive_multiple_of_the_teacher_embedding():
    teacher = torch.tensor([[0.3, -1.2, 2.0], [5.0, 0.1, -0.4]])
    assert feature_kd_loss(2.5 * teacher, teacher).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert feature_kd_loss(-teacher, teacher).tolist() == pytest.approx([4.0, 4.0])


@pytest.fixture(scope="module")
def teacher_ckpt(synth_root, tmp_path_factory) -> str:
    """One tiny teacher, one epoch."""
    run = tmp_path_factory.mktemp("feature_teacher")
    return str(fit(load_config("teacher", tiny_overrides(synth_root, run))))


def build_cache(synth_root: Path, run_dir: Path, teacher: str, *extra: str):
    cfg = distill_cfg(synth_root, run_dir, f"cache.teacher=[{teacher}]", "data.augment=[]", *extra)
    cache_teacher(cfg)
    return cfg


def head_inputs(net: torch.nn.Module, image: torch.Tensor, head: str) -> torch.Tensor:
    """What a global head reads (its forward input), captured by a hook: the pooled vector."""
    seen = []
    hook = net.heads[head].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        net(image)
    hook.remove()
    return seen[0]


@pytest.mark.integration
def test_cache_teacher_stores_each_image_embedding(synth_root, tmp_path, teacher_ckpt):
    cfg = build_cache(synth_root, tmp_path, teacher_ckpt, "kd.features.weight=0.5")
    ensemble = TeacherEnsemble([teacher_ckpt])
    cache = open_checked_cache(cfg, ensemble.tasks)
    dim = ensemble.nets[0].pooled_dim
    assert cache.fingerprint["features"]["dims"] == [dim]
    sums = json.loads((Path(cfg.kd.cache_dir) / "checksums.json").read_text())
    assert "features_0.npy" in sums
    stored = np.load(Path(cfg.kd.cache_dir) / "features_0.npy")
    assert stored.shape == (len(cache.rows), dim) and stored.dtype == np.float16
    assert cache.nbytes_per_sample()["features_0"] == 2 * dim
    from data_modules.datamodule import FundusDataModule

    dataset = FundusDataModule(cfg.data, ensemble.tasks).dataset("train")
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        expected = head_inputs(ensemble.nets[0], item["image"][None], "dr_grade")[0].numpy()
        got = cache.features([item["sample_id"]])[0][0]
        assert np.allclose(got, expected, rtol=2e-3, atol=2e-3), index


@pytest.mark.integration
def test_cache_teacher_refuses_embeddings_of_replayed_views(synth_root, tmp_path, teacher_ckpt):
    cfg = distill_cfg(
        synth_root,
        tmp_path,
        f"cache.teacher=[{teacher_ckpt}]",
        "kd.features.weight=1",
        "cache.views=2",
    )
    with pytest.raises(ConfigError, match="cache.views=0"):
        cache_teacher(cfg)


def train_one_epoch(cfg) -> tuple[StudentModule, object]:
    """A one-epoch distill through ``make_trainer`` on the checked cache."""
    student, dm = build_run(cfg)
    trainer = make_trainer(cfg, None, [], logger=False)
    trainer.fit(student, datamodule=dm)
    return student, trainer


@pytest.mark.integration
def test_distill_trains_the_adaptor_on_the_cached_embeddings(synth_root, tmp_path, teacher_ckpt):
    cfg = build_cache(
        synth_root,
        tmp_path,
        teacher_ckpt,
        "kd.features.weight=0.5",
        "trainer.enable_checkpointing=false",
    )
    # the adaptor's initial weights, the same at each construction (run.seed)
    initial = [build_run(cfg)[0].feature_adaptors[0].weight.detach() for _ in range(2)]
    assert torch.equal(*initial)
    student, trainer = train_one_epoch(cfg)
    dim = TeacherEnsemble([teacher_ckpt]).nets[0].pooled_dim
    adaptor = student.feature_adaptors[0]
    assert (adaptor.in_features, adaptor.out_features) == (student.net.pooled_dim, dim)
    assert float(trainer.callback_metrics["train/features/kd_epoch"]) > 0
    assert not torch.equal(adaptor.weight.detach(), initial[0])
    # The checkpoint records the embedding lengths: it loads with the cache gone, and its network
    # (what export and predict take) holds no adaptor.
    ckpt = tmp_path / "student.ckpt"
    trainer.save_checkpoint(ckpt)
    shutil.rmtree(cfg.kd.cache_dir)
    loaded = StudentModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert torch.equal(loaded.feature_adaptors[0].weight, adaptor.weight.detach())
    assert count_parameters(load_net(ckpt)[0]) == count_parameters(student.net)


@pytest.mark.integration
def test_weight_zero_stores_no_embedding_and_adds_no_term(synth_root, tmp_path, teacher_ckpt):
    cfg = build_cache(synth_root, tmp_path, teacher_ckpt, "trainer.enable_checkpointing=false")
    cache_dir = Path(cfg.kd.cache_dir)
    assert not list(cache_dir.glob("features_*"))
    assert "features" not in json.loads((cache_dir / "fingerprint.json").read_text())
    assert TeacherCache(cache_dir, TeacherEnsemble([teacher_ckpt]).tasks).feature_dims is None
    student, trainer = train_one_epoch(cfg)
    assert len(student.feature_adaptors) == 0
    assert not any(k.startswith("train/features") for k in trainer.callback_metrics)
    # A cache without embeddings is refused by a run that wants them, with the rebuild command.
    with pytest.raises(
        ValueError, match=r"has none; build it with `mtkd cache-teacher kd.features.weight=0.5"
    ):
        build_run(distill_cfg(synth_root, tmp_path, "kd.features.weight=0.5"))


@pytest.mark.unit
def test_map_loss_is_the_pixel_mean_of_the_unit_vector_distances():
    # A 2 x 2 map of 2-channel vectors; per pixel |u - v|^2 = 2 - 2 cos: 0 (same direction),
    # 2 (90 degrees), 4 (opposite), 1 (60 degrees); the sample's loss is their mean, 7 / 4.
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    adapted = torch.tensor([[[2.0, 0.0], [-1.0, 3.0]], [[0.0, 5.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 3.0], [2.0, c]], [[0.0, 0.0], [0.0, s]]])
    loss = feature_kd_loss(adapted[None], teacher[None])
    assert loss.shape == (1,) and float(loss) == pytest.approx(7 / 4)


@pytest.mark.unit
def test_map_stride_must_be_an_encoder_stride_dividing_the_image(synth_root, tmp_path):
    for stride in (12, 64):
        with pytest.raises(ConfigError, match="kd.features.map_stride"):
            distill_cfg(
                synth_root,
                tmp_path,
                "kd.features.map_weight=1",
                f"kd.features.map_stride={stride}",
            )


def build_map_cache(synth_root: Path, run_dir: Path, teachers: str, *extra: str):
    return build_cache(synth_root, run_dir, teachers, "kd.features.map_weight=0.5", *extra)


@pytest.mark.integration
def test_cache_teacher_stores_each_teacher_feature_map(synth_root, tmp_path, teacher_ckpt):
    cfg = build_map_cache(synth_root, tmp_path, f"{teacher_ckpt},{teacher_ckpt}")
    cache_dir = Path(cfg.kd.cache_dir)
    net = TeacherEnsemble([teacher_ckpt]).nets[0]
    shape = [net.map_channels(16), 4, 4]  # 64 px / 16
    found = json.loads((cache_dir / "fingerprint.json").read_text())["features"]
    assert found["map_stride"] == 16 and found["map_shapes"] == [shape, shape]
    assert "dims" not in found and not list(cache_dir.glob("features_*"))
    sums = json.loads((cache_dir / "checksums.json").read_text())
    for i in range(2):
        stored = np.load(cache_dir / f"{feature_map_name(i)}.npy")
        assert f"{feature_map_name(i)}.npy" in sums
        assert stored.shape[1:] == tuple(shape) and stored.dtype == np.float16
    cache = TeacherCache(cache_dir, TeacherEnsemble([teacher_ckpt]).tasks)
    assert cache.nbytes_per_sample()[feature_map_name(0)] == 2 * shape[0] * 4 * 4
    # the teacher's own stride-16 features of the unaugmented image
    dataset = FundusDataModule(cfg.data, cache.tasks).dataset("train")
    item = dataset[0]
    with torch.no_grad():
        expected = net.forward_with_features(item["image"][None], 16)[2][0].numpy()
    got = stored[cache.row(item["sample_id"])].astype(np.float32)
    assert np.allclose(got, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.integration
def test_a_batch_carries_the_cached_map_moved_like_the_image(synth_root, tmp_path, teacher_ckpt):
    cfg = build_map_cache(synth_root, tmp_path, teacher_ckpt)
    tasks = TeacherEnsemble([teacher_ckpt]).tasks
    cache = TeacherCache(cfg.kd.cache_dir, tasks, maps=True)
    flipped = cfg.copy()
    flipped.data.augment = [{"name": "HorizontalFlip", "p": 1.0}]
    item = FundusDataModule(flipped.data, tasks, cache).dataset("train", train=True)[0]
    cached = np.load(Path(cfg.kd.cache_dir) / "feature_map_0.npy")[cache.row(item["sample_id"])]
    carried = item["teacher"][feature_map_name(0)].numpy()
    assert carried.shape == cached.shape
    assert np.allclose(carried, cached[:, :, ::-1].astype(np.float32), atol=1e-5)
    assert not np.allclose(carried, cached.astype(np.float32), atol=1e-3)


@pytest.mark.integration
def test_distill_trains_the_map_adaptor_on_the_cached_maps(synth_root, tmp_path, teacher_ckpt):
    cfg = build_map_cache(synth_root, tmp_path, teacher_ckpt, "trainer.enable_checkpointing=false")
    cfg.data.augment = [{"name": "HorizontalFlip", "p": 0.5}]
    initial = build_run(cfg)[0].map_adaptors[0].weight.detach().clone()
    student, trainer = train_one_epoch(cfg)
    adaptor = student.map_adaptors[0]
    channels = TeacherEnsemble([teacher_ckpt]).nets[0].map_channels(16)
    assert (adaptor.in_channels, adaptor.out_channels) == (student.net.map_channels(16), channels)
    assert float(trainer.callback_metrics["train/feature_maps/kd_epoch"]) > 0
    assert not torch.equal(adaptor.weight.detach(), initial)
    assert not any(k.startswith("train/features/") for k in trainer.callback_metrics)
    ckpt = tmp_path / "student.ckpt"  # the exported network holds no adaptor
    trainer.save_checkpoint(ckpt)
    assert count_parameters(load_net(ckpt)[0]) == count_parameters(student.net)


@pytest.mark.integration
def test_a_cache_without_maps_is_refused_with_the_rebuild(synth_root, tmp_path, teacher_ckpt):
    build_cache(synth_root, tmp_path, teacher_ckpt)
    with pytest.raises(
        ValueError, match=r"has none; build it with `mtkd cache-teacher kd.features.map_weight=0.5"
    ):
        build_run(distill_cfg(synth_root, tmp_path, "kd.features.map_weight=0.5"))
