"""Preprocessing-cache benchmark on real IDRiD photographs (4288x2848 JPEG).

Why: every epoch reads every photograph. Decoding a full IDRiD JPEG costs ~0.15 s, so without
help the loader, not the network, bounds a CPU run. Two things help: JPEG draft mode (libjpeg
decodes at 1/2, 1/4 or 1/8 scale) and the persistent preprocessing cache (the FOV-cropped,
resized image is stored once as .npz). This measures loader samples/s for the configured
``data=idrid`` working size:

- no cache: decode (with draft mode), crop and resize every time;
- cache, cold: the first pass, which decodes and writes the entries;
- cache, warm: later passes (and later runs), which read the entries;

plus the decode alone with and without draft mode. Prints a Markdown table.

    MTKD_DATA_DIR=../shared/data .venv/bin/python bench/bench_preprocess.py [--images 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from data_modules.datamodule import FundusDataModule, FundusDataset
from data_modules.io import load_image
from data_modules.preprocess import Preprocessor
from data_modules.samples import Sample, read_source
from mtkd.config import load_config
from mtkd.tasks import build_tasks

REPO = Path(__file__).resolve().parent.parent


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drain(dataset: FundusDataset, batch_size: int) -> list[torch.Tensor]:
    """One pass of a single-process loader (the configured CPU setting), keeping the images."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    return [batch["image"] for batch in loader]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="first N official training images")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per warm/uncached mode")
    parser.add_argument("--size", type=int, default=None, help="working size (default: config)")
    args = parser.parse_args()

    data_dir = Path(os.environ.get("MTKD_DATA_DIR", REPO.parent / "shared" / "data"))
    overrides = ["data=idrid", "tasks=idrid", f"data.sources.idrid.root={data_dir / 'idrid'}"]
    if args.size:
        overrides.append(f"data.image_size={args.size}")
    cfg = load_config("teacher", overrides)
    size, batch_size = int(cfg.data.image_size), int(cfg.data.batch_size)
    tasks = build_tasks(OmegaConf.to_container(cfg.tasks, resolve=True))
    transform = FundusDataModule(cfg.data, tasks).eval_transform()
    official = read_source("idrid", cfg.data.sources.idrid.root, {"parts": ["B", "C"]})
    samples: list[Sample] = [s for s in official if s.split == "train"][: args.images]
    n = len(samples)

    def dataset(cache_dir: str | None) -> FundusDataset:
        return FundusDataset(samples, tasks, Preprocessor(size, cache_dir=cache_dir), transform)

    rows: list[tuple[str, float]] = []  # (mode, seconds per sample)
    for draft, label in ((None, "full resolution"), (2 * size, f"JPEG draft (>= {2 * size} px)")):
        per_image = [
            seconds(lambda s=s, d=draft: load_image(s.image, draft_size=d)) for s in samples
        ]
        rows.append((f"decode only, {label}", statistics.mean(per_image)))

    uncached = dataset(None)
    times = [seconds(lambda: drain(uncached, batch_size)) for _ in range(args.passes)]
    rows.append(("loader, no cache (decode + crop + resize each time)", statistics.mean(times) / n))
    reference = drain(uncached, batch_size)

    with tempfile.TemporaryDirectory(prefix="mtkd-bench-") as cache_dir:
        cold = seconds(lambda: drain(dataset(cache_dir), batch_size))
        rows.append(("loader, persistent cache, cold pass (fills it)", cold / n))
        warm_set = dataset(cache_dir)
        times = [seconds(lambda: drain(warm_set, batch_size)) for _ in range(args.passes)]
        rows.append(("loader, persistent cache, warm pass (reads it)", statistics.mean(times) / n))
        cached = drain(warm_set, batch_size)
        entries = list(Path(cache_dir).rglob("*.npz"))
        entry_kib = sum(p.stat().st_size for p in entries) / len(entries) / 1024
    if not all(torch.equal(a, b) for a, b in zip(reference, cached)):
        raise AssertionError("cached and uncached loaders disagree: the cache is not transparent")

    no_cache = rows[2][1]
    print(
        f"\nIDRiD preprocessing, {n} training images (4288x2848 JPEG) -> {size}x{size}, "
        f"FOV crop, batch {batch_size}, num_workers=0, torch threads {torch.get_num_threads()}; "
        f"cache entries {entry_kib:.0f} KiB each\n"
    )
    print("| mode | samples/s | ms/sample | speed-up vs no cache |")
    print("|---|---:|---:|---:|")
    for mode, per_sample in rows:
        print(
            f"| {mode} | {1 / per_sample:.1f} | {1000 * per_sample:.1f} | "
            f"{no_cache / per_sample:.1f}x |"
        )
    ratio = no_cache / rows[-1][1]
    print(
        f"\nwarm cache / no cache: {ratio:.1f}x (target >= 10x: {'met' if ratio >= 10 else 'MISSED'})"
    )
    print(f"draft / full decode: {rows[0][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    main()
