"""Manifest CSV round trip, quirks and errors; image reading errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_modules.io import load_image, load_mask
from data_modules.manifest import read_manifest, write_manifest
from data_modules.samples import Sample, read_source

pytestmark = pytest.mark.unit


def test_round_trip_with_partial_labels(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    mask = tmp_path / "m.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    samples = [
        Sample(
            "s1",
            "p1",
            str(img),
            "train",
            {"grade": 2.0, "cdr": 0.45},
            {"vessels": str(mask)},
            {"od": (1.5, 2.0)},
        ),
        Sample("s2", "p1", str(img), None, {}, {}, {}),
    ]
    path = write_manifest(samples, tmp_path / "manifest.csv")
    text = path.read_text().splitlines()
    assert (
        text[0]
        == "sample_id,patient_id,split,image,label:cdr,label:grade,mask:vessels,point:od:x,point:od:y"
    )
    assert text[1].startswith("s1,p1,train,a.png,0.45,2,m.png,1.500,2.000")
    back = read_manifest(tmp_path)
    assert back[0].labels == {"grade": 2.0, "cdr": 0.45}
    assert back[0].points == {"od": (1.5, 2.0)}
    assert back[0].masks["vessels"] == str(mask)
    assert back[1].labels == {} and back[1].split is None
    assert read_source("manifest", tmp_path)[0].sample_id == "s1"


def test_header_quirks_and_errors(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "\ufeffsample_id ,patient_id,split,image,label:grade ,\n s1,p1,train,a.png, 3 ,\n",
        encoding="utf-8",
    )
    assert read_manifest(tmp_path)[0].labels == {"grade": 3.0}
    (tmp_path / "manifest.csv").write_text(
        "sample_id,patient_id,split,image,label:grade\ns1,p1,,a.png,three\n"
    )
    with pytest.raises(ValueError, match="line 2: label:grade='three' is not a number"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("sample_id,image\ns1,a.png\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text(
        "sample_id,patient_id,split,image,point:od:x\ns1,p,,a.png,3\n"
    )
    with pytest.raises(ValueError, match="needs both x and y"):
        read_manifest(tmp_path)


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        load_image(str(tmp_path / "missing.png"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="bad.jpg cannot be decoded"):
        load_image(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source("manifest", tmp_path / "nowhere")


def test_image_and_mask_normalisation(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(gray)
    arr = load_image(str(gray))
    assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8
    mask = load_mask(str(gray))
    assert set(np.unique(mask)) == {0, 1} and mask[0, 0] == 0 and mask[0, 1] == 1
