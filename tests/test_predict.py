"""mtkd predict: predictions come back in the original photograph's pixels, probabilities are
probabilities, overlays are written, and bad inputs get errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_modules.manifest import read_manifest
from data_modules.preprocess import Preprocessor
from mtkd import cli
from mtkd.commands.prediction import predict, prepare
from mtkd.modules.checkpoint import load_net
from tests.conftest import DATA_DIR, PNG_MAGIC, TinyRuns

IDRID_IMAGE = (
    DATA_DIR
    / "idrid"
    / "B. Disease Grading"
    / "1. Original Images"
    / "a. Training Set"
    / "IDRiD_001.jpg"
)


def check_predictions(payload: dict, width: int, height: int) -> None:
    """Probabilities sum to 1, points lie inside the photograph, areas inside the FOV."""
    for entry in payload["predictions"]:
        tasks = entry["tasks"]
        for name in ("dr_grade", "dme_risk", "glaucoma"):
            probs = tasks[name]["probabilities"]
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
            assert tasks[name]["class"] == max(probs, key=probs.get)
        for point in tasks["landmarks"]["points"].values():
            assert 0 <= point["x"] <= width and 0 <= point["y"] <= height
        for name in ("lesions", "anatomy"):
            assert all(0 <= f <= 1 for f in tasks[name]["fov_fraction"].values())
            assert all(0 <= a <= entry["fov_pixels"] for a in tasks[name]["area_px"].values())
        assert isinstance(tasks["cdr"]["values"]["cdr"], float)
        assert Path(entry["overlay"]).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.unit
def test_crop_box_maps_normalised_points_back_to_original_pixels(synth_root: Path) -> None:
    """The inverse of the training preprocessing: x = x0 + u * side, for a known landmark."""
    sample = read_manifest(synth_root)[0]
    preprocessor = Preprocessor(64, fov_crop=True)
    prep, (x0, y0) = prepare(preprocessor, Path(sample.image))
    truth = preprocessor(sample)
    side_w, side_h = prep.pixel_scale
    assert (x0, y0) != (0, 0)  # the synthetic images have a black border: a real crop
    for name, (x, y) in sample.points.items():
        u, v = truth.points[name]
        assert x0 + u * side_w == pytest.approx(x, abs=1e-6)
        assert y0 + v * side_h == pytest.approx(y, abs=1e-6)
    assert prep.points == {}  # the helper's reference point is not left behind


@pytest.mark.integration
def test_predict_folder_of_synthetic_images(
    runs: TinyRuns, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for sample in read_manifest(synth_root)[:3]:
        shutil.copy(sample.image, folder)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    payload = predict(runs.student, folder, out)
    assert json.loads((out / "predictions.json").read_text()) == payload
    assert [Path(e["image"]).name for e in payload["predictions"]] == sorted(
        p.name for p in folder.glob("*.jpg")
    )
    check_predictions(payload, 128, 128)
    assert sorted(p.name for p in out.glob("*_overlay.png")) == sorted(
        f"{p.name}_overlay.png" for p in folder.glob("*.jpg")
    )
    _, tasks, _ = load_net(runs.student)
    printed = capsys.readouterr().out
    assert all(printed.count(f"  {name} ") == 3 for name in tasks)


@pytest.mark.integration
def test_bad_inputs_get_clear_errors(
    runs: TinyRuns, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = f"ckpt={runs.student}"
    assert cli.main(["predict", ckpt, f"images={tmp_path / 'missing.jpg'}"]) == 2
    assert "missing.jpg does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    assert cli.main(["predict", ckpt, f"images={tmp_path / 'empty'}"]) == 2
    assert "holds no images" in capsys.readouterr().err
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    assert cli.main(["predict", ckpt, f"images={tmp_path / 'broken.jpg'}"]) == 2
    assert "broken.jpg cannot be read as an image" in capsys.readouterr().err
    assert cli.main(["predict", f"images={tmp_path}"]) == 2
    assert "predict needs ckpt=" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.realdata
def test_predict_real_idrid_photograph(runs: TinyRuns, tmp_path: Path) -> None:
    if not IDRID_IMAGE.is_file():
        pytest.skip(f"{IDRID_IMAGE} is absent; set MTKD_DATA_DIR to the shared data folder")
    payload = predict(runs.student, IDRID_IMAGE, tmp_path)
    check_predictions(payload, 4288, 2848)
    box = payload["predictions"][0]["fov_box"]
    # The circular field of view is about 3400 px across, centred in the 4288 x 2848 photograph.
    assert box["width"] == box["height"] and 3000 < box["width"] < 4288
    assert abs(box["x0"] + box["width"] / 2 - 4288 / 2) < 300
    assert (tmp_path / "IDRiD_001.jpg_overlay.png").is_file()
