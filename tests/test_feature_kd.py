"""Feature-level KD on the global embedding (``kd.features``): the loss on known vectors, the
teacher embeddings cache-teacher stores, and a distill run that trains the adaptor with them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkd.config import ConfigError
from mtkd.kd.cache import TeacherCache
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
