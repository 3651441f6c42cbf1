"""Caches keyed on content, not on file stats (issue 21, 2.3), and masks checked against their
images before any work (2.9): an image replaced in place after ``cache-teacher`` makes the
teacher cache stale, naming the samples; an old cache that records no image contents is refused
with the rebuild command; a mask of another size than its image is named when samples load."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.datamodule import FundusDataModule, load_samples
from data_modules.manifest import read_manifest, write_manifest
from mtkd.kd.cache import FINGERPRINT, StaleCacheError, check_fingerprint, fingerprint
from mtkd.kd.storage import CacheStorage
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, open_checked_cache
from mtkd.tasks import build_tasks
from tests.conftest import tiny_overrides

STORAGE = CacheStorage(32, "uint8", "float16", {})


def _expected(cfg, images: dict[str, str]) -> dict:
    tasks = build_tasks(dict(cfg.tasks))
    return fingerprint({n: [] for n in tasks}, tasks, cfg.data, images, STORAGE, 0)


@pytest.mark.unit
def test_the_fingerprint_names_the_training_images_whose_content_changed(synth_root, tmp_path):
    cfg = load_config("distill", tiny_overrides(synth_root, tmp_path))
    images = {f"s{i}": f"{i:032x}" for i in range(8)}
    found = _expected(cfg, images)
    assert found["images"] == images
    check_fingerprint(found, found, "runs/c")
    changed = _expected(cfg, {**images, "s2": "f" * 32, "s5": "e" * 32})
    with pytest.raises(StaleCacheError) as err:
        check_fingerprint(found, changed, "runs/c")
    assert "2 of 8 training images changed since it was built (s2, s5)" in str(err.value)
    assert "mtkd cache-teacher teacher=<teacher.ckpt> kd.cache_dir=runs/c" in str(err.value)
    # An older cache records no image contents: refused with the rebuild command, no crash.
    old = {k: v for k, v in found.items() if k != "images"} | {"format_version": 3}
    with pytest.raises(StaleCacheError) as err:
        check_fingerprint(old, found, "runs/c")
    assert "records no image contents (written by an older mtkd)" in str(err.value)
    assert "format_version differs: cache has 3" in str(err.value)
    assert "mtkd cache-teacher" in str(err.value)


def _copied_data(synth_root: Path, tmp_path: Path) -> Path:
    """A copy of the session's synthetic set that this test may rewrite."""
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


@pytest.mark.integration
def test_an_image_replaced_after_caching_makes_the_teacher_cache_stale(synth_root, tmp_path, runs):
    root = _copied_data(synth_root, tmp_path)
    over = [*tiny_overrides(root, tmp_path), f"cache.teacher=[{runs.teacher}]"]
    cfg = load_config("distill", over)
    tasks = build_tasks(dict(cfg.tasks))
    cache_teacher(cfg)
    assert open_checked_cache(cfg, tasks).rows  # unchanged data: accepted
    train = [s for s in FundusDataModule(cfg.data, tasks).split("train")]
    # Same id and path, another photograph's pixels.
    shutil.copyfile(train[1].image, train[0].image)
    for named in ([], [f"kd.teacher={runs.teacher}"]):
        with pytest.raises(StaleCacheError) as err:
            open_checked_cache(load_config("distill", [*over, *named]), tasks)
        assert f"1 of {len(train)} training images changed since it was built " in str(err.value)
        assert f"({train[0].sample_id})" in str(err.value)
        assert "mtkd cache-teacher" in str(err.value)

    # A cache written before image contents were recorded is refused, not crashed on.
    meta = Path(cfg.kd.cache_dir) / FINGERPRINT
    old = json.loads(meta.read_text())
    del old["images"]
    meta.write_text(json.dumps({**old, "format_version": 3}))
    with pytest.raises(StaleCacheError, match=r"records no image contents(.|\n)*mtkd cache-teach"):
        open_checked_cache(cfg, tasks)


@pytest.mark.unit
def test_masks_of_another_size_than_their_image_are_refused_when_samples_load(synth_root, tmp_path):
    samples = read_manifest(synth_root / "manifest.csv")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(small)
    edited = list(samples)
    for i in (3, 7):
        edited[i] = dataclasses.replace(
            samples[i], masks={**samples[i].masks, "optic_disc": str(small)}
        )
    manifest = tmp_path / "manifest.csv"
    write_manifest(edited, manifest)
    over = [o for o in tiny_overrides(synth_root, tmp_path) if "sources.synthetic" not in o]
    source = f"data.sources.m={{kind: manifest, root: {manifest}}}"
    cfg = load_config("teacher", [*over, "~data.sources.synthetic", source])
    tasks = build_tasks(dict(cfg.tasks))
    with pytest.raises(ValueError) as err:
        load_samples(cfg.data, tasks=tasks)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("2 sample(s) have masks that do not match their image")
    assert "replace those masks" in lines[0]
    assert lines[1:] == [
        f"  {edited[i].sample_id} ({manifest} line {i + 2}): mask 'optic_disc' is 48x32, the "
        "image 128x128"
        for i in (3, 7)
    ]
    assert len(load_samples(cfg.data)) == len(samples)  # no task reads masks: nothing to check
