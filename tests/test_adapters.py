"""Dataset adapters on tiny copies of each official layout, written under tmp_path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from data_modules.adapters._common import cache_dir, read_csv
from data_modules.io import load_image, load_mask
from data_modules.samples import Sample, read_source, source_kinds

pytestmark = pytest.mark.unit

SIZE = (32, 24)  # width, height of every generated photograph

ADAPTER_KINDS = {
    "aptos2019",
    "chase_db1",
    "drishti_gs1",
    "drive",
    "eyepacs",
    "folder",
    "idrid",
    "odir5k",
    "refuge",
    "retinamnist",
}


@pytest.fixture(autouse=True)
def derived(tmp_path, monkeypatch) -> Path:
    """The folder mtkd owns for derived masks (``MTKD_CACHE_DIR``), under this test's tmp_path."""
    folder = tmp_path / "mtkd-cache"
    monkeypatch.setenv("MTKD_CACHE_DIR", str(folder))
    return folder


def files_under(folder: Path) -> list[tuple[str, int]]:
    """Every file below ``folder`` with its size: what a read must leave as it was."""
    return sorted((str(p), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def photo(path: Path, value: int = 90, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, value // 3)).save(path)
    return path


def gray(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def text(path: Path, content: str, bom: bool = False) -> Path:
    """Write a CSV or text file; ``bom`` prepends the UTF-8 byte order mark some tools add."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\ufeff" if bom else "").encode() + content.encode())
    return path


def by_id(samples: list[Sample]) -> dict[str, Sample]:
    return {s.sample_id: s for s in samples}


def test_every_kind_is_registered():
    assert ADAPTER_KINDS <= set(source_kinds())


# --------------------------------------------------------------------------- shared CSV reader


def test_read_csv_tolerates_header_quirks(tmp_path):
    path = text(
        tmp_path / "t.csv",
        "Image Name , GRADE,,,\r\nA,1,,,\r\n\r\nB , 2 ,,,\r\n,,,,\r\n,,,,\r\n",
        bom=True,
    )
    rows = read_csv(path, ["image name", "Grade"], optional=["missing"])
    assert rows == [{"image name": "A", "Grade": "1"}, {"image name": "B", "Grade": "2"}]
    assert [r.line for r in rows] == [2, 4]
    assert rows[1].number("Grade") == 2.0


def test_read_csv_errors_name_file_column_and_cell(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nope.csv' in .*restore"):
        read_csv(tmp_path / "nope.csv", ["a"])
    path = text(tmp_path / "t.csv", "a,b\nx,oops\n")
    with pytest.raises(
        ValueError, match=r"lacks column\(s\) \['c'\]; its columns are \['a', 'b'\]"
    ):
        read_csv(path, ["a", "c"])
    with pytest.raises(ValueError, match=r"t.csv line 2: b = 'oops' is not a number"):
        read_csv(path, ["a", "b"])[0].number("b")


# --------------------------------------------------------------------------- IDRiD

B = "B. Disease Grading"
C = "C. Localization"
A = "A. Segmentation"


@pytest.fixture
def idrid_root(tmp_path) -> Path:
    """Parts A, B, C; train has IDRiD_001/002, test restarts at IDRiD_001."""
    root = tmp_path / "idrid"
    images = root / B / "1. Original Images"
    for name in ("IDRiD_001", "IDRiD_002"):
        photo(images / "a. Training Set" / f"{name}.jpg")
    photo(images / "b. Testing Set" / "IDRiD_001.jpg")
    truth = root / B / "2. Groundtruths"
    header = "Image name,Retinopathy grade,Risk of macular edema ,,,\n"
    train_rows = "IDRiD_001,3,2,,,\nIDRiD_002,0,0,,,\n,,,,,\n"
    text(truth / "a. IDRiD_Disease Grading_Training Labels.csv", header + train_rows, bom=True)
    test_rows = "Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,4,1\n"
    text(truth / "b. IDRiD_Disease Grading_Testing Labels.csv", test_rows)
    points = root / C / "2. Groundtruths"
    xy_header = "Image No,X- Coordinate,Y - Coordinate,,\r\n"
    od = points / "1. Optic Disc Center Location"
    text(
        od / "a. IDRiD_OD_Center_Training Set_Markups.csv",
        xy_header + "IDRiD_001,10,20,,\r\nIDRiD_002,11,21,,\r\n,,,,\r\n",
        bom=True,
    )
    text(od / "b. IDRiD_OD_Center_Testing Set_Markups.csv", xy_header + "IDRiD_001,12,22,,\r\n")
    fovea = points / "2. Fovea Center Location"
    text(
        fovea / "IDRiD_Fovea_Center_Training Set_Markups.csv",
        xy_header + "IDRiD_001,5,6\r\nIDRiD_002,7,8\r\n",
    )
    text(fovea / "IDRiD_Fovea_Center_Testing Set_Markups.csv", xy_header + "IDRiD_001,9,10\r\n")
    seg_images = root / A / "1. Original Images"
    photo(seg_images / "a. Training Set" / "IDRiD_01.jpg")
    photo(seg_images / "b. Testing Set" / "IDRiD_55.jpg")
    seg_truth = root / A / "2. All Segmentation Groundtruths"
    lesion = np.zeros(SIZE[::-1], np.uint8)
    lesion[2:5, 3:6] = 255
    for folder, code in (
        ("1. Microaneurysms", "MA"),
        ("2. Haemorrhages", "HE"),
        ("5. Optic Disc", "OD"),
    ):
        path = seg_truth / "a. Training Set" / folder / f"IDRiD_01_{code}.tif"
        path.parent.mkdir(parents=True)
        tifffile.imwrite(path, lesion)
    (seg_truth / "b. Testing Set" / "3. Hard Exudates").mkdir(parents=True)
    tifffile.imwrite(seg_truth / "b. Testing Set" / "3. Hard Exudates" / "IDRiD_55_EX.tif", lesion)
    return root


def test_idrid_reads_parts_a_b_c(idrid_root):
    samples = read_source("idrid", idrid_root)
    images = idrid_root / B / "1. Original Images"
    seg = idrid_root / A / "2. All Segmentation Groundtruths"
    assert [s.sample_id for s in samples] == [
        "idrid/seg-train/IDRiD_01",
        "idrid/seg-test/IDRiD_55",
        "idrid/train/IDRiD_001",
        "idrid/train/IDRiD_002",
        "idrid/test/IDRiD_001",
    ]
    got = by_id(samples)
    assert got["idrid/train/IDRiD_002"] == Sample(
        sample_id="idrid/train/IDRiD_002",
        patient_id="idrid/train/IDRiD_002",
        image=str(images / "a. Training Set" / "IDRiD_002.jpg"),
        split="train",
        labels={"dr_grade": 0.0, "dme_risk": 0.0},
        points={"optic_disc": (11.0, 21.0), "fovea": (7.0, 8.0)},
    )
    seg_train = got["idrid/seg-train/IDRiD_01"]
    assert seg_train.split == "train" and not seg_train.labels and not seg_train.points
    assert seg_train.masks == {
        "microaneurysms": str(seg / "a. Training Set" / "1. Microaneurysms" / "IDRiD_01_MA.tif"),
        "haemorrhages": str(seg / "a. Training Set" / "2. Haemorrhages" / "IDRiD_01_HE.tif"),
        "optic_disc": str(seg / "a. Training Set" / "5. Optic Disc" / "IDRiD_01_OD.tif"),
    }  # no soft or hard exudates drawn: those masks are simply absent
    assert load_mask(seg_train.masks["optic_disc"]).sum() == 9
    assert got["idrid/seg-test/IDRiD_55"].split == "test"
    assert list(got["idrid/seg-test/IDRiD_55"].masks) == ["hard_exudates"]


def test_idrid_keys_by_split_and_name(idrid_root):
    got = by_id(read_source("idrid", idrid_root, {"parts": ["B", "C"]}))
    train, test = got["idrid/train/IDRiD_001"], got["idrid/test/IDRiD_001"]
    assert (train.split, test.split) == ("train", "test")
    assert train.image.endswith("a. Training Set/IDRiD_001.jpg")
    assert test.image.endswith("b. Testing Set/IDRiD_001.jpg")
    assert train.labels == {"dr_grade": 3.0, "dme_risk": 2.0}
    assert test.labels == {"dr_grade": 4.0, "dme_risk": 1.0}
    assert train.points == {"optic_disc": (10.0, 20.0), "fovea": (5.0, 6.0)}
    assert test.points == {"optic_disc": (12.0, 22.0), "fovea": (9.0, 10.0)}
    assert train.patient_id != test.patient_id


def test_idrid_without_part_c_has_no_points(idrid_root):
    shutil.rmtree(idrid_root / C)
    samples = [s for s in read_source("idrid", idrid_root) if "seg" not in s.sample_id]
    assert len(samples) == 3
    assert all(s.points == {} and set(s.labels) == {"dr_grade", "dme_risk"} for s in samples)


def test_idrid_part_c_alone_with_its_own_images(idrid_root):
    shutil.move(idrid_root / B / "1. Original Images", idrid_root / C / "1. Original Images")
    shutil.rmtree(idrid_root / B)
    got = by_id(read_source("idrid", idrid_root, {"parts": ["C"]}))
    assert sorted(got) == ["idrid/test/IDRiD_001", "idrid/train/IDRiD_001", "idrid/train/IDRiD_002"]
    test = got["idrid/test/IDRiD_001"]
    assert test.labels == {} and test.points == {"optic_disc": (12.0, 22.0), "fovea": (9.0, 10.0)}
    assert test.image == str(
        idrid_root / C / "1. Original Images" / "b. Testing Set" / "IDRiD_001.jpg"
    )


def test_idrid_errors_name_the_fix(idrid_root, tmp_path):
    with pytest.raises(ValueError, match=r"unknown parts \['D'\]"):
        read_source("idrid", idrid_root, {"parts": ["B", "D"]})
    with pytest.raises(FileNotFoundError, match="none of the folders"):
        read_source("idrid", tmp_path / "idrid" / A)
    (idrid_root / B / "1. Original Images" / "b. Testing Set" / "IDRiD_001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image 'IDRiD_001' is listed in the IDRiD test"):
        read_source("idrid", idrid_root, {"parts": ["B"]})
    (idrid_root / B / "2. Groundtruths" / "a. IDRiD_Disease Grading_Training Labels.csv").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"matching '\*Training\*.csv' in .*2. Groundtruths"
    ):
        read_source("idrid", idrid_root, {"parts": ["B"]})
    shutil.rmtree(idrid_root / C)
    with pytest.raises(
        FileNotFoundError, match=r"parts=\['C'\] needs the folders \['C. Localization'\]"
    ):
        read_source("idrid", idrid_root, {"parts": ["C"]})


# --------------------------------------------------------------------------- RetinaMNIST


@pytest.fixture
def retinamnist_root(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(n, dtype=np.uint8).reshape(n, 1) + 1
    np.savez_compressed(tmp_path / "retinamnist.npz", **arrays)
    return tmp_path


def test_retinamnist_references_images_inside_the_npz(retinamnist_root):
    samples = read_source("retinamnist", retinamnist_root)
    npz = retinamnist_root / "retinamnist.npz"
    assert [(s.sample_id, s.split, s.labels["dr_grade"]) for s in samples] == [
        ("retinamnist/train/0", "train", 1.0),
        ("retinamnist/train/1", "train", 2.0),
        ("retinamnist/train/2", "train", 3.0),
        ("retinamnist/val/0", "val", 1.0),
        ("retinamnist/test/0", "test", 1.0),
        ("retinamnist/test/1", "test", 2.0),
    ]
    assert samples[4].image == f"{npz}#test_images/0"
    assert samples[4].patient_id == "retinamnist/test/0"
    with np.load(npz) as arrays:
        np.testing.assert_array_equal(load_image(samples[4].image), arrays["test_images"][0])
    assert read_source("retinamnist", npz) == samples  # root may be the file itself


def test_retinamnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected retinamnist.npz"):
        read_source("retinamnist", tmp_path)
    np.savez(tmp_path / "retinamnist.npz", train_images=np.zeros((1, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match=r"lacks arrays \['train_labels', 'val_images'"):
        read_source("retinamnist", tmp_path)


# --------------------------------------------------------------------------- DRIVE


@pytest.fixture
def drive_root(tmp_path) -> Path:
    root = tmp_path / "DRIVE"
    for number in ("21", "22"):
        photo(root / "training" / "images" / f"{number}_training.tif")
        gray(root / "training" / "1st_manual" / f"{number}_manual1.gif", np.full(SIZE[::-1], 255))
        gray(root / "training" / "mask" / f"{number}_training_mask.gif", np.full(SIZE[::-1], 255))
    photo(root / "test" / "images" / "01_test.tif")
    gray(root / "test" / "mask" / "01_test_mask.gif", np.full(SIZE[::-1], 255))
    return root


def test_drive_reads_both_sets_and_tolerates_missing_test_manual(drive_root):
    got = by_id(read_source("drive", drive_root))
    assert list(got) == ["drive/train/21_training", "drive/train/22_training", "drive/test/01_test"]
    train = got["drive/train/22_training"]
    assert train == Sample(
        "drive/train/22_training",
        "drive/train/22_training",
        str(drive_root / "training" / "images" / "22_training.tif"),
        "train",
        masks={
            "vessels": str(drive_root / "training" / "1st_manual" / "22_manual1.gif"),
            "fov": str(drive_root / "training" / "mask" / "22_training_mask.gif"),
        },
    )
    assert got["drive/test/01_test"].masks == {
        "fov": str(drive_root / "test" / "mask" / "01_test_mask.gif")
    }
    assert load_image(train.image).shape == (24, 32, 3)


def test_drive_error_without_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="training/images and/or test/images"):
        read_source("drive", tmp_path)


# --------------------------------------------------------------------------- CHASE_DB1


def chase_photo(path: Path) -> Path:
    """A bright disc on black with a dark spot inside (a hole) and a bright speck outside."""
    yy, xx = np.mgrid[: SIZE[1], : SIZE[0]]
    inside = (yy - 12) ** 2 + (xx - 16) ** 2 <= 10**2
    pixels = np.zeros((*inside.shape, 3), np.uint8)
    pixels[inside] = (160, 60, 30)
    pixels[11:13, 15:17] = (5, 5, 5)  # dark vessel crossing: a hole the FOV must fill
    pixels[0, 0] = (200, 200, 200)  # speck outside: not the largest component
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")  # lossless, so pixel values are exact
    return path


@pytest.fixture
def chase_root(tmp_path) -> Path:
    root = tmp_path / "CHASEDB1"
    for stem in ("Image_01L", "Image_01R", "Image_02L"):
        chase_photo(root / f"{stem}.jpg")
        gray(root / f"{stem}_1stHO.png", np.full(SIZE[::-1], 255))
        if stem != "Image_02L":
            gray(root / f"{stem}_2ndHO.png", np.full(SIZE[::-1], 255))
    return root


def expected_fov() -> np.ndarray:
    yy, xx = np.mgrid[: SIZE[1], : SIZE[0]]
    return ((yy - 12) ** 2 + (xx - 16) ** 2 <= 10**2).astype(np.uint8)


def test_chase_db1_samples_patients_and_derived_fov(chase_root):
    samples = read_source("chase_db1", chase_root)
    fov_dir = cache_dir(chase_root, None, "fov", "chase_db1")
    assert [(s.sample_id, s.patient_id, s.split) for s in samples] == [
        ("chase_db1/Image_01L", "chase_db1/01", None),
        ("chase_db1/Image_01R", "chase_db1/01", None),
        ("chase_db1/Image_02L", "chase_db1/02", None),
    ]
    first = samples[0]
    assert first.masks == {
        "vessels": str(chase_root / "Image_01L_1stHO.png"),
        "vessels_2nd": str(chase_root / "Image_01L_2ndHO.png"),
        "fov": str(fov_dir / "Image_01L_fov.png"),
    }
    assert set(samples[2].masks) == {"vessels", "fov"}  # no 2nd observer file: no vessels_2nd
    np.testing.assert_array_equal(load_mask(first.masks["fov"]), expected_fov())
    assert sorted(p.name for p in fov_dir.iterdir()) == [
        "Image_01L_fov.png",
        "Image_01R_fov.png",
        "Image_02L_fov.png",
    ]  # written atomically: no temporary files left behind


def test_chase_db1_fov_is_written_once(chase_root, tmp_path):
    fov_dir = tmp_path / "fovs"
    read_source("chase_db1", chase_root, {"fov_dir": str(fov_dir)})
    cached = fov_dir / "Image_01L_fov.png"
    os.utime(cached, (cached.stat().st_atime, cached.stat().st_mtime + 100))
    stamp = cached.stat().st_mtime_ns
    samples = read_source("chase_db1", chase_root, {"fov_dir": str(fov_dir)})
    assert samples[0].masks["fov"] == str(cached)
    assert cached.stat().st_mtime_ns == stamp


def test_a_photo_rewritten_in_place_has_its_fov_derived_again(chase_root, monkeypatch):
    import data_modules.io as io_module

    first = read_source("chase_db1", chase_root)[0]
    photo_path, fov = Path(first.image), Path(first.masks["fov"])
    before = photo_path.stat()
    pixels = np.asarray(Image.open(photo_path)).copy()
    pixels[:, 20:] = 0  # the right of the disc is gone: a smaller FOV
    Image.fromarray(pixels).save(photo_path, format="PNG")
    os.utime(photo_path, ns=(before.st_atime_ns, before.st_mtime_ns))  # restored: no newer
    monkeypatch.setattr(io_module, "_DIGESTS", {})  # as a new run, which hashes files afresh
    read_source("chase_db1", chase_root)
    assert fov.stat().st_mtime_ns > before.st_mtime_ns
    np.testing.assert_array_equal(load_mask(str(fov)), expected_fov() * (np.arange(SIZE[0]) < 20))


def test_derived_masks_go_to_mtkds_cache_folder_never_beside_read_only_data(
    chase_root, refuge_root, drishti_root, derived, tmp_path
):
    data = tmp_path / "readonly"
    for root in (chase_root, refuge_root, drishti_root):
        shutil.copytree(root, data / root.name)
    before = files_under(tmp_path)
    for path in [data, *data.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)  # chmod -w, like a read-only data mount
    try:
        read = {
            kind: read_source(kind, data / name)
            for kind, name in [
                ("chase_db1", chase_root.name),
                ("refuge", refuge_root.name),
                ("drishti_gs1", drishti_root.name),
            ]
        }
    finally:
        for path in [data, *data.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    masks = [Path(m) for samples in read.values() for s in samples for m in s.masks.values()]
    derived_masks = [m for m in masks if not m.is_relative_to(data)]
    assert len(derived_masks) == 3 + 4 + 2  # chase FOVs, refuge disc + cup, drishti disc + cup
    assert all(m.is_relative_to(derived) and m.is_file() for m in derived_masks)
    # Nothing was written anywhere else: not into the data, not beside it.
    assert [f for f in files_under(tmp_path) if not Path(f[0]).is_relative_to(derived)] == before
    assert cache_dir(data / "x", None, "masks", "refuge") != cache_dir(
        data / "y", None, "masks", "refuge"
    )  # one folder per copy of a dataset


def test_chase_db1_error_without_images(tmp_path):
    photo(tmp_path / "other.jpg")
    with pytest.raises(FileNotFoundError, match=r"no Image_NN\{L,R\}.jpg photographs"):
        read_source("chase_db1", tmp_path)


# --------------------------------------------------------------------------- Drishti-GS1


@pytest.fixture
def drishti_root(tmp_path) -> Path:
    root = tmp_path / "drishti"
    files = root / "Drishti-GS1_files"
    photo(files / "Training" / "Images" / "drishtiGS_002.png")
    photo(files / "Training" / "Images" / "drishtiGS_004.png")
    photo(files / "Test" / "Images" / "drishtiGS_001.png")
    soft = np.zeros(SIZE[::-1], np.uint8)
    soft[:, :8] = 127  # just under half the experts: background
    soft[:, 8:16] = 128  # exactly half: foreground
    soft[:, 16:] = 255
    gt = files / "Training" / "GT" / "drishtiGS_002"
    gray(gt / "SoftMap" / "drishtiGS_002_ODsegSoftmap.png", soft)
    gray(gt / "SoftMap" / "drishtiGS_002_cupsegSoftmap.png", soft[::2, ::2])  # half size
    text(gt / "drishtiGS_002_cdrValues.txt", "0.7 0.6 0.8 0.7\n")
    (files / "Training" / "GT" / "drishtiGS_004").mkdir(parents=True)  # no ground truth inside
    return root


def test_drishti_gs1_masks_at_majority_and_mean_cdr(drishti_root):
    samples = read_source("drishti_gs1", drishti_root)
    cache = cache_dir(drishti_root, None, "masks", "drishti_gs1")
    images = drishti_root / "Drishti-GS1_files"
    assert [(s.sample_id, s.split) for s in samples] == [
        ("drishti_gs1/train/drishtiGS_002", "train"),
        ("drishti_gs1/train/drishtiGS_004", "train"),
        ("drishti_gs1/test/drishtiGS_001", "test"),
    ]
    first = samples[0]
    assert first.image == str(images / "Training" / "Images" / "drishtiGS_002.png")
    assert first.patient_id == first.sample_id
    assert first.labels == {"cdr": pytest.approx(0.7)}
    assert first.masks == {
        "optic_disc": str(cache / "train" / "drishtiGS_002_optic_disc.png"),
        "optic_cup": str(cache / "train" / "drishtiGS_002_optic_cup.png"),
    }
    expected = np.zeros(SIZE[::-1], np.uint8)
    expected[:, 8:] = 1
    np.testing.assert_array_equal(load_mask(first.masks["optic_disc"]), expected)
    np.testing.assert_array_equal(load_mask(first.masks["optic_cup"]), expected)  # resized
    assert samples[1].labels == {} and samples[1].masks == {}  # GT folder without files
    assert samples[2].labels == {} and samples[2].masks == {}  # test set without GT


def test_drishti_gs1_accepts_the_files_folder_as_root(drishti_root, tmp_path):
    inner = drishti_root / "Drishti-GS1_files"
    samples = read_source("drishti_gs1", inner, {"mask_dir": str(tmp_path / "m")})
    assert [s.sample_id for s in samples][0] == "drishti_gs1/train/drishtiGS_002"
    assert samples[0].masks["optic_disc"] == str(
        tmp_path / "m" / "train" / "drishtiGS_002_optic_disc.png"
    )


def test_drishti_gs1_errors(drishti_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no Training/Images or Test/Images"):
        read_source("drishti_gs1", tmp_path)
    gt = drishti_root / "Drishti-GS1_files" / "Training" / "GT" / "drishtiGS_002"
    text(gt / "drishtiGS_002_cdrValues.txt", "n/a\n")
    with pytest.raises(ValueError, match="drishtiGS_002_cdrValues.txt holds no CDR values"):
        read_source("drishti_gs1", drishti_root)


# --------------------------------------------------------------------------- REFUGE


def refuge_bitmap(path: Path) -> Path:
    """Columns 0-9 background (255), 10-19 disc rim (128), 20-31 cup (0)."""
    values = np.full(SIZE[::-1], 255, np.uint8)
    values[:, 10:20] = 128
    values[:, 20:] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path, format="BMP")
    return path


@pytest.fixture
def refuge_root(tmp_path) -> Path:
    root = tmp_path / "REFUGE"
    photo(root / "Training400" / "Glaucoma" / "g0001.jpg")
    photo(root / "Training400" / "Non-Glaucoma" / "n0001.jpg")
    refuge_bitmap(root / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0001.bmp")
    text(
        root / "Annotation-Training400" / "Fovea_location.csv",
        "ID,ImgName ,Fovea_X,Fovea_Y,,\n1,g0001.jpg,10.5,11.5,,\n2,n0001.jpg,12,13,,\n,,,,,\n",
        bom=True,
    )
    photo(root / "REFUGE-Validation400" / "V0001.jpg")
    photo(root / "REFUGE-Validation400" / "V0002.jpg")
    refuge_bitmap(root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / "V0001.bmp")
    text(
        root / "REFUGE-Validation400-GT" / "Fovea_locations.csv",
        "ImgName,Fovea_X,Fovea_Y,Glaucoma Label \nV0001.jpg,1,2,1\nV0002.jpg,3,4,0\n",
    )
    return root


def test_refuge_training_and_validation(refuge_root):
    samples = read_source("refuge", refuge_root)
    cache = cache_dir(refuge_root, None, "masks", "refuge")
    got = by_id(samples)
    assert list(got) == [
        "refuge/train/g0001",
        "refuge/train/n0001",
        "refuge/val/V0001",
        "refuge/val/V0002",
    ]
    assert got["refuge/train/g0001"] == Sample(
        "refuge/train/g0001",
        "refuge/train/g0001",
        str(refuge_root / "Training400" / "Glaucoma" / "g0001.jpg"),
        "train",
        labels={"glaucoma": 1.0},
        masks={
            "optic_disc": str(cache / "train" / "g0001_optic_disc.png"),
            "optic_cup": str(cache / "train" / "g0001_optic_cup.png"),
        },
        points={"fovea": (10.5, 11.5)},
    )
    healthy = got["refuge/train/n0001"]
    assert healthy.labels == {"glaucoma": 0.0} and healthy.masks == {}  # no bitmap shipped
    assert healthy.points == {"fovea": (12.0, 13.0)}
    val = got["refuge/val/V0001"]
    assert (
        val.split == "val"
        and val.labels == {"glaucoma": 1.0}
        and val.points == {"fovea": (1.0, 2.0)}
    )
    assert got["refuge/val/V0002"].labels == {"glaucoma": 0.0}
    disc, cup = load_mask(val.masks["optic_disc"]), load_mask(val.masks["optic_cup"])
    assert disc[:, :10].sum() == 0 and disc[:, 10:].all()  # rim and cup
    assert cup[:, :20].sum() == 0 and cup[:, 20:].all()


def test_refuge_without_fovea_tables(refuge_root):
    (refuge_root / "Annotation-Training400" / "Fovea_location.csv").unlink()
    (refuge_root / "REFUGE-Validation400-GT" / "Fovea_locations.csv").unlink()
    samples = read_source("refuge", refuge_root)
    assert all(s.points == {} for s in samples)
    assert [s.labels for s in samples] == [{"glaucoma": 1.0}, {"glaucoma": 0.0}, {}, {}]


def test_refuge_errors(refuge_root, tmp_path):
    (refuge_root / "REFUGE-Validation400" / "V0002.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"image 'V0002.jpg' is listed in .*Fovea_locations.csv"
    ):
        read_source("refuge", refuge_root)
    with pytest.raises(
        FileNotFoundError, match="expected Training400/ and/or REFUGE-Validation400/"
    ):
        read_source("refuge", tmp_path / "REFUGE" / "Training400")


# --------------------------------------------------------------------------- APTOS 2019


@pytest.fixture
def aptos_root(tmp_path) -> Path:
    root = tmp_path / "aptos"
    text(
        root / "train.csv", "id_code,diagnosis ,\n000c1434d8d7,2,\n001639a390f0,4,\n,,\n", bom=True
    )
    photo(root / "train_images" / "000c1434d8d7.png")
    photo(root / "train_images" / "001639a390f0.png")
    text(root / "test.csv", "id_code\n0005cfc8afb6\n")
    photo(root / "test_images" / "0005cfc8afb6.png")
    return root


def test_aptos2019_labels_and_optional_unlabeled_test(aptos_root):
    samples = read_source("aptos2019", aptos_root)
    assert samples == [
        Sample(
            "aptos2019/train/000c1434d8d7",
            "aptos2019/train/000c1434d8d7",
            str(aptos_root / "train_images" / "000c1434d8d7.png"),
            None,
            {"dr_grade": 2.0},
        ),
        Sample(
            "aptos2019/train/001639a390f0",
            "aptos2019/train/001639a390f0",
            str(aptos_root / "train_images" / "001639a390f0.png"),
            None,
            {"dr_grade": 4.0},
        ),
    ]
    with_test = read_source("aptos2019", aptos_root, {"include_unlabeled_test": True})
    assert with_test[:2] == samples
    assert [(s.sample_id, s.split, s.labels) for s in with_test[2:]] == [
        ("aptos2019/test/0005cfc8afb6", None, {})
    ]


def test_aptos2019_errors(aptos_root):
    (aptos_root / "train_images" / "001639a390f0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image '001639a390f0' is listed in .*train.csv"):
        read_source("aptos2019", aptos_root)
    (aptos_root / "train.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected the CSV file 'train.csv' in .*aptos"):
        read_source("aptos2019", aptos_root)


# --------------------------------------------------------------------------- EyePACS


@pytest.fixture
def eyepacs_root(tmp_path) -> Path:
    root = tmp_path / "eyepacs"
    text(root / "trainLabels.csv", "image,level\n10_left,0\n10_right,2\n13_left,4\n\n")
    for name in ("10_left", "10_right", "13_left"):
        photo(root / "train" / f"{name}.jpeg")
    return root


def test_eyepacs_grades_and_patients(eyepacs_root):
    samples = read_source("eyepacs", eyepacs_root)
    assert [(s.sample_id, s.patient_id, s.split, s.labels["dr_grade"]) for s in samples] == [
        ("eyepacs/train/10_left", "eyepacs/10", None, 0.0),
        ("eyepacs/train/10_right", "eyepacs/10", None, 2.0),
        ("eyepacs/train/13_left", "eyepacs/13", None, 4.0),
    ]
    assert samples[0].image == str(eyepacs_root / "train" / "10_left.jpeg")


def test_eyepacs_images_directly_under_root(eyepacs_root):
    for path in (eyepacs_root / "train").iterdir():
        path.rename(eyepacs_root / path.name)
    (eyepacs_root / "train").rmdir()
    samples = read_source("eyepacs", eyepacs_root)
    assert samples[2].image == str(eyepacs_root / "13_left.jpeg")


def test_eyepacs_errors(eyepacs_root):
    (eyepacs_root / "train" / "13_left.jpeg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image '13_left' is listed in .*trainLabels.csv"):
        read_source("eyepacs", eyepacs_root)
    (eyepacs_root / "trainLabels.csv").unlink()
    with pytest.raises(FileNotFoundError, match="'trainLabels.csv'"):
        read_source("eyepacs", eyepacs_root)


# --------------------------------------------------------------------------- ODIR-5K

ODIR_HEADER = "ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,N,D,G,C,A,H,M,O"


def test_odir5k_one_sample_per_eye_with_patient_labels(tmp_path):
    root = tmp_path / "odir"
    text(
        root / "data.csv",
        f"{ODIR_HEADER},,\n0,69,Female,0_left.jpg,0_right.jpg,0,0,0,1,0,0,0,0,,\n"
        "1,57,Male,1_left.jpg,1_right.jpg,1,0,0,0,0,0,0,0,,\n",
        bom=True,
    )
    for name in ("0_left", "0_right", "1_left", "1_right"):
        photo(root / "Training Images" / f"{name}.jpg")
    samples = read_source("odir5k", root)
    assert [(s.sample_id, s.patient_id, s.split) for s in samples] == [
        ("odir5k/train/0_left", "odir/0", None),
        ("odir5k/train/0_right", "odir/0", None),
        ("odir5k/train/1_left", "odir/1", None),
        ("odir5k/train/1_right", "odir/1", None),
    ]
    assert samples[1].labels == dict(N=0.0, D=0.0, G=0.0, C=1.0, A=0.0, H=0.0, M=0.0, O=0.0)
    assert samples[1].image == str(root / "Training Images" / "0_right.jpg")


def test_odir5k_full_df_uses_the_kept_image_of_each_row(tmp_path):
    root = tmp_path / "odir"
    text(
        root / "full_df.csv",
        f"{ODIR_HEADER},filepath,labels,target,filename\n"
        "0,69,Female,0_left.jpg,0_right.jpg,0,0,0,1,0,0,0,0,x,['C'],t,0_right.jpg\n"
        "1,57,Male,1_left.jpg,1_right.jpg,1,0,0,0,0,0,0,0,x,['N'],t,1_left.jpg\n"
        "1,57,Male,1_left.jpg,1_right.jpg,1,0,0,0,0,0,0,0,x,['N'],t,1_right.jpg\n",
    )
    for name in ("0_right", "1_left", "1_right"):  # 0_left was discarded by the export
        photo(root / "preprocessed_images" / f"{name}.jpg")
    samples = read_source("odir5k", root)
    assert [s.sample_id for s in samples] == [
        "odir5k/train/0_right",
        "odir5k/train/1_left",
        "odir5k/train/1_right",
    ]


def test_odir5k_reads_each_eyes_keywords_as_its_text(tmp_path):
    """The left image gets the left keywords; ODIR's full-width comma separates like ','."""
    root = tmp_path / "odir"
    text(
        root / "data.csv",
        f"{ODIR_HEADER},Left-Diagnostic Keywords,Right-Diagnostic Keywords\n"
        '0,69,Female,0_left.jpg,0_right.jpg,0,0,0,1,0,0,0,1,Cataract,"normal fundus"\n'
        "1,57,Male,1_left.jpg,1_right.jpg,0,1,0,0,0,0,0,1,"
        'Laser Spot，moderate non proliferative retinopathy,"drusen, lens dust ,"\n'
        "2,40,Male,2_left.jpg,2_right.jpg,1,0,0,0,0,0,0,0,,normal fundus\n",
    )
    for name in ("0_left", "0_right", "1_left", "1_right", "2_left", "2_right"):
        photo(root / "Training Images" / f"{name}.jpg")
    texts = {s.sample_id.split("/")[-1]: s.texts for s in read_source("odir5k", root)}
    assert texts == {
        "0_left": {"keywords": "cataract"},
        "0_right": {"keywords": "normal fundus"},
        "1_left": {"keywords": "laser spot, moderate non proliferative retinopathy"},
        "1_right": {"keywords": "drusen, lens dust"},
        "2_left": {},  # an empty cell: no text
        "2_right": {"keywords": "normal fundus"},
    }
    # Without the keyword columns the labels are read and no eye has a text.
    text(root / "data.csv", f"{ODIR_HEADER}\n0,69,F,0_left.jpg,0_right.jpg,0,0,0,1,0,0,0,0\n")
    assert [s.texts for s in read_source("odir5k", root)] == [{}, {}]


def test_odir5k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotation CSV .* \['full_df.csv', 'data.csv'\]"):
        read_source("odir5k", tmp_path)
    text(tmp_path / "data.csv", f"{ODIR_HEADER}\n0,69,F,0_left.jpg,0_right.jpg,0,0,0,1,0,0,0,0\n")
    photo(tmp_path / "Training Images" / "0_left.jpg")
    with pytest.raises(FileNotFoundError, match=r"image '0_right.jpg' is listed in .*data.csv"):
        read_source("odir5k", tmp_path)


# --------------------------------------------------------------------------- plain folder


def test_folder_of_unlabeled_images(tmp_path):
    root = tmp_path / "unlabeled"
    photo(root / "b.JPG")
    photo(root / "a" / "x.png")
    photo(root / "a" / "deeper" / "y.TIFF")
    photo(root / ".cache" / "hidden.png")
    text(root / "notes.txt", "not an image")
    samples = read_source("folder", root, {"name": "clinic"})
    assert [(s.sample_id, s.split, s.labels) for s in samples] == [
        ("clinic/a/deeper/y", "train", {}),
        ("clinic/a/x", "train", {}),
        ("clinic/b", "train", {}),
    ]
    assert samples[2].image == str(root / "b.JPG") and samples[2].patient_id == "clinic/b"
    assert read_source("folder", root)[0].sample_id == "folder/a/deeper/y"


def test_folder_without_images_is_an_error(tmp_path):
    text(tmp_path / "notes.txt", "x")
    with pytest.raises(ValueError, match="produced no samples"):
        read_source("folder", tmp_path)
