"""One working size, per-source preprocessing sizes (``data.sources.<name>.preprocess_size``,
issue 20): a union of two datasets at different sizes builds, each source is cropped and cached
at its own size, every batch has the working size ``data.image_size``, and the teacher cache's
fingerprint follows a source's size."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from data_modules.datamodule import FundusDataModule
from data_modules.preprocess import ENTRY_SUFFIX, read_entry, source_sizes
from mtkd.config import ConfigError
from mtkd.kd.cache import StaleCacheError, check_fingerprint, fingerprint
from mtkd.kd.storage import CacheStorage
from mtkd.run_config import load_config
from mtkd.tasks import build_tasks

pytestmark = pytest.mark.unit

#: the tiny runs' working size (tests/conftest.py)
WORKING = 64


@pytest.fixture
def two_sources(tiny, synth_root: Path, tmp_path: Path) -> Callable[..., list[str]]:
    """``two_sources(**extra)`` -> tiny overrides for a union of the synthetic set and ``disc``,
    a manifest copy of it under other sample and patient ids (a second dataset)."""
    disc = tmp_path / "disc"
    shutil.copytree(synth_root, disc, ignore=shutil.ignore_patterns("synth.json"))
    with open(disc / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["sample_id"], row["patient_id"] = (
            f"disc_{row['sample_id']}",
            f"disc_{row['patient_id']}",
        )
    with open(disc / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def make(**extra: object) -> list[str]:
        return tiny(
            **{"data.sources.disc.kind": "manifest", "data.sources.disc.root": disc, **extra}
        )

    return make


def test_each_source_is_cached_at_its_own_size_and_batched_at_the_working_size(two_sources):
    sizes = {"data.sources.synthetic.preprocess_size": 48, "data.sources.disc.preprocess_size": 96}
    cfg = load_config("teacher", two_sources(**sizes))
    dm = FundusDataModule(cfg.data, build_tasks(dict(cfg.tasks)))
    train = dm.dataset("train", train=True)
    picked = [
        i
        for source in ("synthetic", "disc")
        for i in [i for i, x in enumerate(train.samples) if x.source == source][:3]
    ]
    batch = default_collate([train[i] for i in picked])

    assert batch["source"] == ["synthetic"] * 3 + ["disc"] * 3
    assert batch["image"].shape == (6, 3, WORKING, WORKING)
    assert batch["targets"]["anatomy"].shape[-2:] == (WORKING, WORKING)
    # Each source's entries hold its images and masks at its own size, not the working size.
    entries = [
        read_entry(p)[0] for p in Path(cfg.data.preprocess.cache_dir).rglob(f"*{ENTRY_SUFFIX}")
    ]
    sides = Counter(arrays["image"].shape[:2] for arrays in entries)
    assert sides == {(48, 48): 3, (96, 96): 3}
    assert all(
        a.shape[:2] == arrays["image"].shape[:2] for arrays in entries for a in arrays.values()
    )


def test_the_teacher_cache_is_stale_when_a_source_is_preprocessed_at_another_size(two_sources):
    def expected(size: int | None) -> dict:
        cfg = load_config(
            "distill", two_sources(**{"data.sources.disc.preprocess_size": size or "null"})
        )
        tasks = build_tasks(dict(cfg.tasks))
        storage = CacheStorage(WORKING, "uint8", "float16", {})
        return fingerprint({n: [] for n in tasks}, tasks, cfg.data, {"s": "0" * 32}, storage, 0)

    at_96 = expected(96)
    assert at_96["preprocessing"]["source_sizes"] == {"disc": 96}
    with pytest.raises(StaleCacheError, match="preprocessing differs"):
        check_fingerprint(at_96, expected(80), "runs/c")
    # The working size itself is no size of its own: a cache written before the setting holds.
    assert expected(WORKING) == expected(None)
    assert "source_sizes" not in expected(None)["preprocessing"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.sources.disc.preprocess_size=16",
            r"data.sources.disc.preprocess_size=16 is out of range: it must be >= 32",
        ),
        (
            "data.sources.disc.image_size=384",
            r"data.sources.disc.image_size: Key 'image_size' not in 'SourceConfig'; valid keys "
            r"under data.sources.disc: .*preprocess_size",
        ),
    ],
)
def test_a_bad_source_size_is_one_line_naming_the_key_and_the_fix(two_sources, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("teacher", [*two_sources(), override])
    assert "\n" not in str(err.value)


def test_a_config_saved_before_per_source_sizes_reads_as_the_working_size() -> None:
    """A checkpoint's saved config from before ``preprocess_size`` existed (no such key, not
    merged with today's schema: ``mtkd report`` of an older run) preprocesses at the working
    size instead of failing on the missing key."""
    saved = OmegaConf.create(
        {"image_size": 96, "sources": {"synthetic": {"kind": "synthetic", "root": "x"}}}
    )
    assert source_sizes(saved) == {}
    saved.sources.synthetic.preprocess_size = 192
    assert source_sizes(saved) == {"synthetic": 192}
