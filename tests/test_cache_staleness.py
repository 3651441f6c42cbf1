"""A multi-view cache replays the augmentation its views were drawn with: another
``data.augment`` (or albumentations version) is refused, naming the fix. And a distill run reads
its data sources once, however many parts (cache check, prepare_data, setup) need them."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_modules.samples import Sample, register_source
from data_modules.synthetic import synthetic_source
from mtkd.kd.cache import StaleCacheError, check_fingerprint
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, fit, open_checked_cache
from mtkd.tasks import build_tasks
from tests.conftest import distill_cfg, tiny_overrides

AUGMENT = "data.augment=[{name: Affine, rotate: [-30, 30], p: 1.0}]"
OTHER_AUGMENT = "data.augment=[{name: Affine, rotate: [-5, 5], p: 1.0}]"
#: the roots the counting source was asked to read, in order
READS: list[Path] = []


@register_source("counted", generates=True)
def counted_source(root: Path, **options) -> list[Sample]:
    """The synthetic source, counting its reads."""
    READS.append(root)
    return synthetic_source(root, **options)


@pytest.fixture(scope="module")
def teacher(synth_root, tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("teacher")
    return str(fit(load_config("teacher", tiny_overrides(synth_root, run))))


@pytest.mark.integration
def test_changed_augmentation_is_refused_against_a_multi_view_cache(synth_root, tmp_path, teacher):
    cfg = distill_cfg(synth_root, tmp_path, f"cache.teacher=[{teacher}]", "cache.views=2", AUGMENT)
    cache_teacher(cfg)
    tasks = build_tasks(dict(cfg.tasks))
    assert open_checked_cache(cfg, tasks).views == 2  # the augmentation it was drawn with
    changed = distill_cfg(synth_root, tmp_path, "cache.views=2", OTHER_AUGMENT)
    with pytest.raises(
        StaleCacheError,
        match=r"its 2 cached views were drawn with another data.augment,(.|\n)*mtkd cache-teacher",
    ):
        open_checked_cache(changed, tasks)


@pytest.mark.integration
def test_a_distill_run_reads_its_sources_once(synth_root, tmp_path, teacher):
    source = ["data.sources.synthetic.kind=counted"]
    cfg = distill_cfg(synth_root, tmp_path, f"cache.teacher=[{teacher}]", *source)
    READS.clear()
    cache_teacher(cfg)
    assert READS == [synth_root]  # prepare_data and setup("predict") share one read
    READS.clear()
    fit(distill_cfg(synth_root, tmp_path, *source))
    assert READS == [synth_root]  # the cache check, prepare_data and setup share one read


@pytest.mark.unit
def test_a_new_albumentations_version_is_named_with_the_fix() -> None:
    part = {"dense_size": 32, "dense_dtype": "uint8", "logits_dtype": "float16", "views": 3}
    found = {
        "format_version": 3,
        "task_teachers": {},
        "storage": {**part, "augment": "abc", "albumentations": "2.0.8"},
    }
    expected = {**found, "storage": {**part, "augment": "abc", "albumentations": "2.1.0"}}
    with pytest.raises(
        StaleCacheError,
        match=r"its 3 cached views were drawn with another albumentations version(.|\n)*"
        r"mtkd cache-teacher .*kd.cache_dir=runs/c",
    ):
        check_fingerprint(found, expected, "runs/c")
    check_fingerprint(found, found, "runs/c")
    single = {**found, "storage": part}  # views=0 records no augmentation: nothing to replay
    check_fingerprint(single, single, "runs/c")
