"""Measures derived from predicted masks and points (mtkd.derived): the measures on hand-drawn
masks, the config checks, and evaluate / predict / export of a tiny trained run with them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_modules.manifest import read_manifest
from mtkd.commands.exporting import metadata
from mtkd.commands.prediction import predict
from mtkd.config import ConfigError, import_plugins
from mtkd.derived import (
    MEASURES,
    lesion_area,
    lesion_area_near_fovea,
    lesion_count,
    measure_image,
    parse_derived,
    saved_derived,
    vertical_cdr,
)
from mtkd.evaluation import value_scores
from mtkd.modules.checkpoint import load_net
from mtkd.run_config import load_config
from mtkd.stages import evaluate
from mtkd.tasks import build_tasks
from tests.conftest import REPO, TinyRuns

TASKS = build_tasks(
    {
        "cdr": {"kind": "regression"},
        "lesions": {"kind": "segmentation", "classes": ["microaneurysms", "hard_exudates"]},
        "anatomy": {"kind": "segmentation", "classes": ["optic_disc", "optic_cup"]},
        "landmarks": {"kind": "localization", "points": ["optic_disc", "fovea"]},
    }
)
CDR = {"measure": "vertical_cdr", "disc": "anatomy.optic_disc", "cup": "anatomy.optic_cup"}
CDR_OVERRIDE = (
    "derived.cdr_from_masks={measure: vertical_cdr, disc: anatomy.optic_disc, "
    "cup: anatomy.optic_cup, label: cdr}"
)
COUNT_OVERRIDE = "derived.ma_count={measure: lesion_count, mask: lesions.microaneurysms}"


def rows(first: int, last: int, size: int = 64, cols: slice = slice(20, 40)) -> np.ndarray:
    """A mask filling rows ``first`` to ``last`` (inclusive) in the columns ``cols``."""
    mask = np.zeros((size, size), dtype=bool)
    mask[first : last + 1, cols] = True
    return mask


@pytest.mark.unit
def test_vertical_cdr_of_drawn_disc_and_cup() -> None:
    disc, cup = rows(10, 29), rows(15, 24, cols=slice(25, 35))
    assert vertical_cdr(disc, cup) == 0.5
    # A cup cut in two by a vessel still spans rows 15-24.
    assert vertical_cdr(disc, cup & ~rows(18, 21)) == 0.5
    # Cup pixels outside the disc are not cup.
    assert vertical_cdr(disc, cup | rows(40, 50)) == 0.5
    assert vertical_cdr(np.zeros_like(disc), cup) == 0.0


@pytest.mark.unit
def test_lesion_count_and_area_of_three_blobs() -> None:
    mask = np.zeros((50, 50), dtype=bool)
    mask[2:5, 2:5] = True  # 9 px
    mask[10:12, 30:35] = True  # 10 px
    mask[40, 40] = mask[41, 41] = True  # touching at a corner: one lesion of 2 px
    assert lesion_count(mask) == 3
    assert lesion_area(mask) == pytest.approx(21 / 2500)
    assert lesion_count(np.zeros_like(mask)) == 0


@pytest.mark.unit
def test_lesion_area_within_one_and_two_disc_diameters_of_the_fovea() -> None:
    size = 100
    disc = np.zeros((size, size), dtype=bool)
    disc[:10, :10] = True  # area 100 px: diameter 2 sqrt(100 / pi) = 11.28 px
    mask = np.zeros((size, size), dtype=bool)
    mask[30, 55] = True  # 5 px from the fovea: within one diameter
    mask[30, 65] = True  # 15 px: within two
    mask[30, 80] = True  # 30 px: beyond two
    fovea = (50.5 / size, 30.5 / size)  # the centre of pixel (x=50, y=30)
    one = lesion_area_near_fovea(mask, disc, fovea)
    two = lesion_area_near_fovea(mask, disc, fovea, diameters=2.0)
    assert (one, two) == (1 / size**2, 2 / size**2)
    assert lesion_area_near_fovea(mask, np.zeros_like(disc), fovea) == 0.0


@pytest.mark.unit
def test_measure_image_reads_each_tasks_thresholded_output() -> None:
    derived = parse_derived(
        {
            "cdr": CDR,
            "near": {
                "measure": "lesion_area_near_fovea",
                "mask": "lesions.hard_exudates",
                "disc": "anatomy.optic_disc",
                "fovea": "landmarks.fovea",
            },
        },
        TASKS,
    )
    anatomy = torch.stack([torch.from_numpy(rows(10, 29)), torch.from_numpy(rows(15, 24))]) * 0.9
    lesions = torch.zeros(2, 64, 64)
    lesions[1, 40, 40] = 0.6  # above the 0.5 threshold
    lesions[1, 41, 41] = 0.4  # below it
    values = {
        "anatomy": anatomy.float(),
        "lesions": lesions,
        "landmarks": torch.tensor([[0.5, 0.5], [40.5 / 64, 40.5 / 64]]),
    }
    assert measure_image(TASKS, derived, values) == {"cdr": 0.5, "near": 1 / 64**2}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"measure": "cdr"}, "derived.x.measure='cdr' is unknown; choose one of: lesion_area,"),
        ({**CDR, "cup": "anatomy.cup"}, "give one of: lesions.microaneurysms, lesions.hard_exu"),
        ({**CDR, "cup": "anatomic.optic_cup"}, "derived.x.cup='anatomic.optic_cup' is not a mask"),
        ({**CDR, "disc": "landmarks.optic_disc"}, "is not a mask of the run's tasks"),
        ({"measure": "vertical_cdr", "disc": "anatomy.optic_disc"}, "missing options ['cup']"),
        ({**CDR, "thresh": 0.4}, "unknown options ['thresh']; valid options: disc, cup"),
        ({**CDR, "label": 3}, "derived.x.label=3: give the name of a label"),
        ({"disc": "anatomy.optic_disc"}, "derived.x: give {measure: <name>,"),
    ],
)
def test_config_errors_name_the_fix(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_derived({"x": entry}, TASKS)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.unit
def test_a_run_config_is_checked_before_any_work() -> None:
    with pytest.raises(ConfigError, match="derived.cdr_from_masks.cup='anatomy.cup' is not"):
        load_config("teacher", [CDR_OVERRIDE.replace("anatomy.optic_cup", "anatomy.cup")])
    assert set(load_config("teacher", [CDR_OVERRIDE]).derived) == {"cdr_from_masks"}


@pytest.mark.unit
def test_value_scores_mae_and_r2() -> None:
    target = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    pred = target + torch.tensor([0.1, -0.1, 0.1, -0.1], dtype=torch.float64)
    found = value_scores(pred[None], target[None])
    assert found["mae"].tolist() == pytest.approx([0.1])
    assert found["r2"].tolist() == pytest.approx([1 - 0.04 / 0.2])
    assert math.isnan(value_scores(pred[None, :1], target[None, :1])["r2"])


@pytest.mark.integration
def test_evaluate_scores_a_derived_measure_against_its_label(
    runs: TinyRuns, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "metrics.json"
    metrics = evaluate(
        str(runs.teacher), "test", [CDR_OVERRIDE, COUNT_OVERRIDE], out=str(out), bootstrap=200
    )
    payload = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for metric in ("mae", "r2"):
        key = f"test/derived/cdr_from_masks/{metric}"
        assert payload["metrics"][key] == metrics[key]
        lo, hi = payload["ci"][key]
        assert lo <= metrics[key] <= hi or metric == "r2", key
    lo, hi = payload["ci"]["test/derived/cdr_from_masks/mae"]
    mae = metrics["test/derived/cdr_from_masks/mae"]
    assert 0 <= mae <= 1
    assert f"derived/cdr_from_masks mae={mae:.4f} [{lo:.4f}, {hi:.4f}]" in printed
    # A measure without a label is not scored.
    assert not any("ma_count" in k for k in metrics)


@pytest.mark.integration
def test_predict_and_export_carry_the_derived_measures(
    runs: TinyRuns, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = read_manifest(synth_root)[0].image
    payload = predict(runs.teacher, image, tmp_path / "out", [CDR_OVERRIDE, COUNT_OVERRIDE])
    printed = capsys.readouterr().out
    for entry in payload["predictions"]:
        found = entry["derived"]
        assert set(found) == {"cdr_from_masks", "ma_count"}
        assert 0 <= found["cdr_from_masks"] <= 1 and found["ma_count"] >= 0
        line = f"cdr_from_masks={found['cdr_from_masks']:.3f}  ma_count={found['ma_count']:.3f}"
        assert line in printed
    with pytest.raises(ConfigError, match="derived.<name>="):
        predict(runs.teacher, image, tmp_path / "other", ["data.image_size=32"])
    net, tasks, cfg = load_net(runs.teacher)
    meta = metadata(runs.teacher, net, tasks, cfg, saved_derived(cfg, tasks, [CDR_OVERRIDE]))
    entry = meta["derived"]["cdr_from_masks"]
    assert entry["inputs"] == {"disc": "anatomy.optic_disc", "cup": "anatomy.optic_cup"}
    assert entry["label"] == "cdr" and "rows spanned by the cup" in entry["formula"]


@pytest.mark.unit
def test_a_plugin_measure_is_chosen_through_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "examples" / "extending"))
    entry = {**CDR, "measure": "horizontal_cdr", "min_disc_px": 4}
    with pytest.raises(ConfigError, match="'horizontal_cdr' is unknown"):
        parse_derived({"h": entry}, TASKS)
    import_plugins(["measure"])
    try:
        derived = parse_derived({"h": entry}, TASKS)
    finally:
        MEASURES.unregister("horizontal_cdr")
    assert derived["h"].options == {"min_disc_px": 4}
    wide_disc, cup = rows(10, 29, cols=slice(20, 40)), rows(15, 24, cols=slice(25, 35))
    assert sys.modules["measure"].horizontal_cdr(wide_disc, cup) == 0.5
    with pytest.raises(ConfigError, match="missing options"):
        parse_derived({"h": {"measure": "lesion_count"}}, TASKS)
