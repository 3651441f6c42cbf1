"""The data-source example of docs/extending.md, a file outside the library
(``examples/extending/data_source.py``), feeds a data module through the config alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.datamodule import FundusDataModule
from mtkd.run_config import load_config
from mtkd.tasks import build_tasks
from tests.conftest import REPO

pytestmark = pytest.mark.integration

EXAMPLES = REPO / "examples" / "extending"
IMAGES = 12


def write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["image,grade,patient"]
    for i in range(IMAGES):
        pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"eye{i:02d}.png")
        rows.append(f"eye{i:02d}.png,{i % 5},p{i // 2}")
    (root / "grades.csv").write_text("\n".join(rows) + "\n")


def test_plugin_source_feeds_a_task_through_the_config(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    write_folder(tmp_path)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("grade: {kind: classification, label: grade, num_classes: 5}\n")
    cfg = load_config(
        "teacher",
        [
            "plugins=[data_source]",
            "~data.sources.synthetic",
            f"data.sources.mine={{kind: graded_folder, root: {tmp_path}}}",
            f"tasks={tasks}",
            "data.image_size=32",
            "data.preprocess.cache_dir=null",
            "data.split_file=null",
        ],
    )
    dm = FundusDataModule(cfg.data, build_tasks(dict(cfg.tasks)))
    dm.setup("fit")
    samples = {s.sample_id: s for s in dm.samples}
    assert len(samples) == IMAGES
    assert samples["graded/eye07"].labels == {"grade": 2.0}
    # Both eyes of a patient on the same side of every split.
    for i in range(0, IMAGES, 2):
        assert samples[f"graded/eye{i:02d}"].split == samples[f"graded/eye{i + 1:02d}"].split
    item = dm.dataset("train")[0]
    assert item["image"].shape == (3, 32, 32)
    assert bool(item["has"]["grade"])
    assert int(item["targets"]["grade"]) == int(samples[item["sample_id"]].labels["grade"])
