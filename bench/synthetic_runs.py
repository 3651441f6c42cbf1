"""Overrides the synthetic-data benchmarks share: a private dataset, preprocessing cache and
teacher cache under the benchmark's temporary folder, no logger, no progress bar."""

from __future__ import annotations

from pathlib import Path


def synthetic_overrides(work: Path, size: int, images: int) -> list[str]:
    """``images`` synthetic photographs (at least 256 px, generated on first use) in ``work``,
    trained at ``size`` px."""
    return [
        f"data.sources.synthetic.root={work / 'synth'}",
        f"data.sources.synthetic.options={{n: {images}, image_size: {max(256, size)}, seed: 0}}",
        f"data.image_size={size}",
        f"data.preprocess.cache_dir={work / 'pre'}",
        f"kd.cache_dir={work / 'cache'}",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
