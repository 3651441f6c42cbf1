"""Teachers limited to some data sources (``kd.teachers[i].sources``) and per-source evaluation
(``mtkd evaluate sources=...``): a specialist teaches only its own dataset's images, its tasks
learn from labels elsewhere, and a union model is scored dataset by dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from data_modules.datamodule import FundusDataModule
from mtkd.config import ConfigError, to_container
from mtkd.kd.cache import StaleCacheError, source_reach, taught_masks
from mtkd.kd.ensemble import TeacherEntry, combine_per_source
from mtkd.kd.teacher_source import OnlineTeacher, build_teacher_source
from mtkd.modules.student import StudentModule
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, evaluate, fit, open_checked_cache
from mtkd.tasks import build_tasks
from tests.test_combined_data import combined  # noqa: F401  (the fixture)


class MeanTask:
    """The one method ``combine_per_source`` uses, as the base Task defines it."""

    def combine_teachers(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(outputs).mean(dim=0)


@pytest.mark.unit
def test_each_image_is_taught_by_the_teachers_of_its_source():
    a = torch.tensor([[1.0], [2.0], [3.0]])
    b = torch.tensor([[5.0], [6.0], [7.0]])
    only_x, everywhere = TeacherEntry("a.ckpt", sources=["x"]), TeacherEntry("b.ckpt")
    sources = ["x", "y", "x"]
    got = combine_per_source(MeanTask(), [a, b], [only_x, everywhere], sources)
    assert got.flatten().tolist() == [3.0, 6.0, 5.0]  # x: mean of both; y: b alone
    # Alone, a teaches x only: y keeps a's output as a placeholder, masked out of the KD loss.
    alone = combine_per_source(MeanTask(), [a], [only_x], sources)
    assert alone.flatten().tolist() == [1.0, 2.0, 3.0]
    reach = source_reach({"t": [["x"]], "u": [["x"], None], "v": [None]}, [["x"], None])
    assert reach == {"t": [["x"]], "u": [["x"], None], "features_0": [["x"]]}
    masks = taught_masks(reach, sources)
    assert masks["t"].tolist() == [True, False, True]
    assert masks["u"].tolist() == [True, True, True]  # the unrestricted teacher covers y
    assert masks["features_0"].tolist() == [True, False, True]


@pytest.mark.unit
def test_unknown_sources_of_a_teacher_are_refused(tiny):
    with pytest.raises(ConfigError, match=r"kd.teachers\[0\].sources=\['idrid'\].*unknown"):
        load_config("distill", [*tiny(), "kd.teachers=[{path: t.ckpt, sources: [idrid]}]"])


@pytest.mark.integration
def test_a_teacher_limited_to_one_source_teaches_only_its_images(combined, tmp_path: Path):  # noqa: F811
    teacher = fit(load_config("teacher", combined()))
    limited = f"[{{path: {teacher}, sources: [synthetic]}}]"
    kd = {"kd.teachers": limited, "kd.features.weight": 0.1}
    cache_teacher(load_config("distill", combined(**kd)))
    # Unaugmented batches: the online teacher then sees the very images the cache was written
    # from (an augmented view's global outputs matched the cached ones only for lucky draws).
    student = {"run.dir": tmp_path / "student", "data.augment": "[]", **kd}
    cfg = load_config("distill", combined(**student))
    tasks = build_tasks(dict(cfg.tasks))
    cache = open_checked_cache(cfg, tasks)
    recorded = cache.fingerprint["task_teachers"]
    assert all(f["sources"] == ["synthetic"] for t in tasks for f in recorded[t])

    module = StudentModule(to_container(cfg), build_teacher_source("cached", cache))
    module.teacher_source.setup(module.cfg)
    assert set(module.teacher_source.reach) == {*tasks, "features_0"}  # and its embedding
    dm = FundusDataModule(cfg.data, tasks, teacher=cache)
    train = dm.dataset("train", train=True)
    synthetic = [i for i, s in enumerate(train.samples) if s.source == "synthetic"]
    others = [i for i, s in enumerate(train.samples) if s.source != "synthetic"]
    batch = default_collate([train[i] for i in [*synthetic[:3], *others[:5]]])
    taught = module.teacher_source.taught(batch)
    from_synthetic = torch.tensor([s == "synthetic" for s in batch["source"]])
    assert from_synthetic.tolist() == [True] * 3 + [False] * 5  # idrid and unlabeled images
    for name in [*tasks, "features_0"]:
        assert taught[name].tolist() == from_synthetic.tolist()
    online = OnlineTeacher()
    online.setup(load_config("distill", combined(**kd, **{"kd.mode": "online"})))
    assert online.reach == module.teacher_source.reach  # the same limits, read from the config
    live = online.outputs(batch)
    for name in ["dr_grade", "glaucoma"]:
        assert torch.allclose(live[name][:3], batch["teacher"][name][:3], atol=2e-2)
    # The KD term is the mean over the synthetic images only.
    outputs = module(batch["image"])
    got = module.kd_losses(outputs, batch["teacher"], taught)["dr_grade"]
    task = module.tasks["dr_grade"]
    per_sample = task.kd_loss(
        outputs["dr_grade"], batch["teacher"]["dr_grade"], module.temperature["dr_grade"]
    )
    assert got.item() == pytest.approx(per_sample[from_synthetic].mean().item(), rel=1e-5)

    # The sources are part of what the cache records: another limit makes it stale.
    wider = f"[{{path: {teacher}, sources: [synthetic, idrid]}}]"
    other = load_config("distill", combined(**{"run.dir": tmp_path / "s2", "kd.teachers": wider}))
    with pytest.raises(StaleCacheError, match=r"on synthetic, idrid"):
        open_checked_cache(other, tasks)


@pytest.mark.integration
def test_evaluate_scores_one_source_of_a_union_model(combined, tmp_path: Path):  # noqa: F811
    best = fit(load_config("teacher", combined()))
    everything = evaluate(str(best), "test", [], bootstrap=0)
    idrid = evaluate(str(best), "test", [], bootstrap=0, sources=["idrid"])
    written = json.loads((best.parent.parent / "metrics_test-idrid.json").read_text())
    assert written["sources"] == ["idrid"] and written["metrics"] == idrid
    # IDRiD labels no lesions: its test images alone give that task no metric.
    assert any(k.startswith("test/lesions/") for k in everything)
    assert not any(k.startswith("test/lesions/") for k in idrid)
    cfg = load_config("teacher", combined())
    scored = FundusDataModule(cfg.data, build_tasks(dict(cfg.tasks)), scored_sources=["idrid"])
    assert {s.sample_id for s in scored.split("test")} == {
        "idrid/test/IDRiD_001",
        "idrid/test/IDRiD_002",
    }
    assert len(scored.split("train")) == len(FundusDataModule(cfg.data, {}).split("train"))
    with pytest.raises(ValueError, match=r"\['eyepacs'\] are not data sources"):
        evaluate(str(best), "test", [], bootstrap=0, sources=["eyepacs"])
