"""Preprocessing-cache benchmark on real IDRiD photographs (4288x2848 JPEG) or the synthetic set.

Why: every epoch reads every photograph. Decoding a full IDRiD JPEG costs ~0.15 s, so without
help the loader, not the network, bounds a CPU run. Two things help: JPEG draft mode (libjpeg
decodes at 1/2, 1/4 or 1/8 scale) and the persistent preprocessing cache (the FOV-cropped,
resized image is stored once, uncompressed). This measures loader samples/s for the configured
``data=idrid`` working size:

- no cache: decode (with draft mode), crop and resize every time;
- cache, cold: the first pass, which decodes and writes the entries;
- cache, warm: later passes (and later runs), which read the entries;
- ceiling: the same loader fed the prepared arrays from memory (transform, targets and
  collation only), the best a cache can do; warm and ceiling passes alternate, so a change
  of machine load shifts both alike;

plus the decode alone with and without draft mode, and the bad-image pre-scan every run
starts with: cold (decodes and hashes every image) and warm (hashes every image: the cache and
the pre-scan key on file content, so a file rewritten in place is never served stale; as a new
run, with no digest remembered). Prints a Markdown table.

    MTKD_DATA_DIR=../shared/data .venv/bin/python bench/bench_preprocess.py [--images 32]
    .venv/bin/python bench/bench_preprocess.py --source synthetic [--images 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import data_modules.io as io_module
from data_modules.datamodule import FundusDataModule, FundusDataset
from data_modules.io import NPZ_SEPARATOR, load_image
from data_modules.preprocess import ENTRY_SUFFIX, Prepared, Preprocessor
from data_modules.samples import Sample, read_source
from data_modules.synthetic import generate_synthetic
from mtkd.markdown import markdown_table
from mtkd.run_config import load_config
from mtkd.tasks import build_tasks

REPO = Path(__file__).resolve().parent.parent


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class InMemory(Preprocessor):
    """A preprocessor that hands out arrays prepared beforehand: no disk, no decode."""

    def __init__(self, size: int, prepared: dict[str, Prepared]) -> None:
        super().__init__(size)
        self.prepared = prepared

    def __call__(self, sample: Sample, mask_names: list[str] | None = None) -> Prepared:
        return self.prepared[sample.sample_id]


def drain(dataset: FundusDataset, batch_size: int) -> list[torch.Tensor]:
    """One pass of a single-process loader (the configured CPU setting), keeping the images."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    return [batch["image"] for batch in loader]


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def pre_scan(samples: list[Sample], size: int, cache_dir: str) -> float:
    """Seconds of one run's bad-image pre-scan, as a new run: no file digest remembered."""
    io_module._DIGESTS.clear()
    return seconds(lambda: Preprocessor(size, cache_dir=cache_dir).bad_images(samples))


def bench_samples(source: str, images: int, work: Path) -> tuple[list[str], list[Sample]]:
    """The overrides and the first ``images`` training samples of ``source``: the official
    IDRiD training set, or a synthetic set (256 px JPEGs) generated under ``work``."""
    if source == "synthetic":
        root = work / "synthetic"
        options = {"n": 2 * images, "image_size": 256, "seed": 0}
        generate_synthetic(root, **options, progress=False)
        opts = "{" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}"
        overrides = [
            f"data.sources.synthetic.root={root}",
            f"data.sources.synthetic.options={opts}",
        ]
        official = read_source("synthetic", root, options)
    else:
        data_dir = Path(os.environ.get("MTKD_DATA_DIR", REPO.parent / "shared" / "data"))
        overrides = ["data=idrid", "tasks=idrid", f"data.sources.idrid.root={data_dir / 'idrid'}"]
        official = read_source("idrid", data_dir / "idrid", {"parts": ["B", "C"]})
    return overrides, [s for s in official if s.split == "train"][:images]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["idrid", "synthetic"], default="idrid")
    parser.add_argument("--images", type=int, default=32, help="first N training images")
    parser.add_argument("--passes", type=int, default=3, help="timed passes without the cache")
    parser.add_argument(
        "--fast-passes", type=int, default=30, help="timed passes each, warm cache and ceiling"
    )
    parser.add_argument("--size", type=int, default=None, help="working size (default: config)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mtkd-bench-"))
    overrides, samples = bench_samples(args.source, args.images, work)
    if args.size:
        overrides.append(f"data.image_size={args.size}")
    cfg = load_config("teacher", overrides)
    size, batch_size = int(cfg.data.image_size), int(cfg.data.batch_size)
    tasks = build_tasks(OmegaConf.to_container(cfg.tasks, resolve=True))
    transform = FundusDataModule(cfg.data, tasks).eval_transform()
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
    no_cache = statistics.median(times) / n
    rows.append(("loader, no cache (decode + crop + resize each time)", no_cache))
    reference = drain(uncached, batch_size)

    with tempfile.TemporaryDirectory(prefix="mtkd-bench-") as cache_dir:
        rows.append(
            (
                "image pre-scan, cold (decode + hash each image)",
                pre_scan(samples, size, cache_dir) / n,
            )
        )
        warm_scans = [pre_scan(samples, size, cache_dir) for _ in range(args.passes)]
        rows.append(("image pre-scan, warm (hash each image)", statistics.median(warm_scans) / n))
        cold = seconds(lambda: drain(dataset(cache_dir), batch_size))
        rows.append(("loader, persistent cache, cold pass (fills it)", cold / n))
        warm_set = dataset(cache_dir)
        prepared = {s.sample_id: warm_set.preprocessor(s, warm_set.mask_names) for s in samples}
        ceiling_set = FundusDataset(samples, tasks, InMemory(size, prepared), transform)
        warm_times, ceiling_times = [], []
        for _ in range(args.fast_passes):
            warm_times.append(seconds(lambda: drain(warm_set, batch_size)))
            ceiling_times.append(seconds(lambda: drain(ceiling_set, batch_size)))
        warm, ceiling = statistics.median(warm_times) / n, statistics.median(ceiling_times) / n
        rows.append(("loader, persistent cache, warm pass (reads it)", warm))
        rows.append(("ceiling: same loader, prepared arrays in memory", ceiling))
        cached = drain(warm_set, batch_size) + drain(ceiling_set, batch_size)
        entries = list(Path(cache_dir).rglob(f"*{ENTRY_SUFFIX}"))
        entry_kib = sum(p.stat().st_size for p in entries) / len(entries) / 1024
    if not all(torch.equal(a, b) for a, b in zip(reference * 2, cached)):
        raise AssertionError("cached and uncached loaders disagree: the cache is not transparent")
    files = {s.image.split(NPZ_SEPARATOR)[0] for s in samples}
    image_kib = sum(Path(f).stat().st_size for f in files) / len(files) / 1024
    shutil.rmtree(work)

    print(
        f"\n{args.source} preprocessing, {n} training images ({image_kib:.0f} KiB each on "
        f"average) -> {size}x{size}, batch {batch_size}, num_workers=0, torch threads "
        f"{torch.get_num_threads()}; cache entries {entry_kib:.1f} KiB each\n"
    )
    header = ["mode", "samples/s", "ms/sample", "speed-up vs no cache"]
    cells = [
        [mode, f"{1 / per_sample:.1f}", f"{1000 * per_sample:.2f}", f"{no_cache / per_sample:.1f}x"]
        for mode, per_sample in rows
    ]
    print(markdown_table(header, cells, right={1, 2, 3}))
    speed_up, share = no_cache / warm, ceiling / warm
    print(f"\nwarm cache / no cache: {speed_up:.1f}x (target >= 30x: {met(speed_up >= 30)})")
    print(f"warm / ceiling = {100 * share:.0f} % (target >= 80 %: {met(share >= 0.8)})")
    print(f"draft / full decode: {rows[0][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    main()
