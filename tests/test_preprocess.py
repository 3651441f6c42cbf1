"""Preprocessing: the FOV box, points that follow the crop, contrast enhancement, and the
persistent disk cache (hit, bit-identical read-back, stale file, other version, corrupt entry,
atomic writes)."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_modules.io as io_module
import data_modules.preprocess as preprocess
from data_modules.preprocess import ENTRY_SUFFIX, Preprocessor, enhance, fov_box, read_entry
from data_modules.samples import Sample

pytestmark = pytest.mark.unit

SIZE = 64
#: the bright square field of view of ``square_fov_photo``: x0, y0, side (original pixels)
FOV = (192, 64, 640)
#: a red marker centred here, at normalised (0.25, 0.75) of the FOV box
MARKER = (FOV[0] + 0.25 * FOV[2], FOV[1] + 0.75 * FOV[2])


def disc_image(height: int, width: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    """A black frame around a bright, mildly textured disc, like a fundus photograph."""
    yy, xx = np.mgrid[:height, :width]
    inside = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2
    texture = np.random.default_rng(0).integers(60, 200, (height, width, 1))
    return np.where(inside[..., None], texture + np.array([40, 0, -40]), 0).astype(np.uint8)


def square_fov_photo(path: Path) -> Path:
    """A 1024x768 JPEG (large enough for draft decoding) with a bright square FOV and a marker."""
    image = np.zeros((768, 1024, 3), np.uint8)
    x0, y0, side = FOV
    image[y0 : y0 + side, x0 : x0 + side] = (120, 120, 120)
    mx, my = (int(v) for v in MARKER)
    image[my - 24 : my + 24, mx - 24 : mx + 24] = (255, 0, 0)
    Image.fromarray(image).save(path, quality=95)
    return path


def write_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


@pytest.fixture
def photo(tmp_path: Path) -> Sample:
    path = write_png(tmp_path / "photo.png", disc_image(90, 120, (60, 45), 40))
    return Sample("s", "s", str(path), "train", points={"fovea": (60.0, 45.0)})


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every image reference the preprocessor decodes, in order."""
    calls: list[str] = []

    def counting_load_image(ref: str, draft_size: int | None = None) -> np.ndarray:
        calls.append(ref)
        return io_module.load_image(ref, draft_size)

    monkeypatch.setattr(preprocess, "load_image", counting_load_image)
    return calls


def same(a: preprocess.Prepared, b: preprocess.Prepared) -> bool:
    return (
        np.array_equal(a.image, b.image)
        and a.points == b.points
        and a.pixel_scale == b.pixel_scale
        and a.box == b.box
        and a.masks.keys() == b.masks.keys()
        and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    )


# --------------------------------------------------------------------------- FOV box and points


def test_fov_box_is_the_square_around_a_disc_in_a_black_frame():
    x0, y0, w, h = fov_box(disc_image(200, 300, (150, 100), 80))
    assert (w, h) == pytest.approx((161, 161), abs=2)
    assert (x0, y0) == pytest.approx((70, 20), abs=2)


def test_fov_box_extends_past_a_disc_clipped_at_the_top_and_bottom():
    # IDRiD-like: the disc is wider than the photograph is high.
    x0, y0, w, h = fov_box(disc_image(100, 300, (150, 50), 80))
    assert w == h == pytest.approx(161, abs=2)
    assert y0 == pytest.approx(50 - 80, abs=2)


def test_fov_box_is_the_whole_image_without_a_dark_frame():
    assert fov_box(np.full((50, 50, 3), 128, np.uint8)) == (0, 0, 50, 50)


def test_points_follow_the_crop_of_a_draft_decoded_jpeg(tmp_path: Path):
    path = square_fov_photo(tmp_path / "photo.jpg")
    sample = Sample("s", "s", str(path), "train", points={"marker": MARKER})
    prepared = Preprocessor(SIZE, cache_dir=None)(sample)
    assert prepared.pixel_scale == pytest.approx((FOV[2], FOV[2]), abs=8)
    assert prepared.points["marker"] == pytest.approx((0.25, 0.75), abs=0.02)
    # The marker's pixels land where its normalised point says (image and points agree).
    red = (prepared.image[..., 0] > 180) & (prepared.image[..., 1] < 90)
    ys, xs = np.nonzero(red)
    centre = ((xs.mean() + 0.5) / SIZE, (ys.mean() + 0.5) / SIZE)
    assert centre == pytest.approx(prepared.points["marker"], abs=1.5 / SIZE)


def test_without_fov_crop_points_are_normalised_by_the_whole_image(photo: Sample):
    prepared = Preprocessor(SIZE, fov_crop=False, cache_dir=None)(photo)
    assert prepared.pixel_scale == (120.0, 90.0)
    assert prepared.points["fovea"] == (0.5, 0.5)
    assert prepared.image.shape == (SIZE, SIZE, 3)


# --------------------------------------------------------------------------- enhancement


@pytest.mark.parametrize("clahe, local_mean", [(True, False), (False, True), (True, True)])
def test_enhancement_changes_pixels_but_not_shape_or_dtype(clahe: bool, local_mean: bool):
    image = disc_image(96, 96, (48, 48), 40)
    enhanced = enhance(image.copy(), clahe, local_mean)
    assert enhanced.shape == image.shape and enhanced.dtype == np.uint8
    assert not np.array_equal(enhanced, image)


def test_local_mean_keeps_the_frame_black():
    image = disc_image(96, 96, (48, 48), 40)
    enhanced = enhance(image, clahe=False, local_mean=True)
    assert not enhanced[image.max(axis=2) <= preprocess.FOV_THRESHOLD].any()


# --------------------------------------------------------------------------- disk cache


def test_second_call_reads_the_cache_instead_of_decoding(
    photo: Sample, tmp_path: Path, decodes: list[str]
):
    cache = tmp_path / "cache"
    first = Preprocessor(SIZE, cache_dir=str(cache))(photo)
    second = Preprocessor(SIZE, cache_dir=str(cache))(photo)  # a new process would do the same
    assert decodes == [photo.image]
    assert same(first, second)
    assert len(list(cache.rglob(f"*{ENTRY_SUFFIX}"))) == 1


def test_other_settings_are_another_entry(photo: Sample, tmp_path: Path, decodes: list[str]):
    cache = str(tmp_path / "cache")
    Preprocessor(SIZE, cache_dir=cache)(photo)
    Preprocessor(SIZE, clahe=True, cache_dir=cache)(photo)
    Preprocessor(SIZE // 2, cache_dir=cache)(photo)
    assert len(decodes) == 3


def test_a_setting_changed_on_the_same_preprocessor_is_a_miss(
    photo: Sample, tmp_path: Path, decodes: list[str]
):
    prep = Preprocessor(SIZE, cache_dir=str(tmp_path / "cache"))
    plain = prep(photo)
    prep.clahe = True  # the entry path it remembers must not outlive the setting
    enhanced = prep(photo)
    assert len(decodes) == 2 and not np.array_equal(plain.image, enhanced.image)


def test_an_edited_image_is_a_miss(photo: Sample, tmp_path: Path, decodes: list[str]):
    prep = Preprocessor(SIZE, cache_dir=str(tmp_path / "cache"))
    before = prep(photo)
    write_png(Path(photo.image), disc_image(90, 120, (60, 45), 30))
    stat = os.stat(photo.image)
    os.utime(photo.image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = prep(photo)
    assert len(decodes) == 2
    assert not np.array_equal(before.image, after.image)
    assert same(after, prep(photo)) and len(decodes) == 2


def old_npz(entry: bytes) -> bytes:
    """A version-1 entry (an .npz), as an older checkout wrote at this path."""
    buf = io.BytesIO()
    np.savez(buf, image=np.zeros((SIZE, SIZE, 3), np.uint8), box=np.arange(4))
    return buf.getvalue()


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: entry[: len(entry) // 2],  # e.g. a crash mid-copy
        lambda entry: entry[:-1],  # header whole, last array one byte short
        lambda entry: entry + b"\0",  # more bytes than the header describes
        lambda entry: b"",
        lambda entry: b"[1, 2]\n" + entry,  # a header of another layout
        old_npz,
    ],
    ids=["half", "one-byte-short", "one-byte-long", "empty", "other-header", "old-npz"],
)
def test_a_corrupt_entry_is_rebuilt(photo: Sample, tmp_path: Path, decodes: list[str], damage):
    cache = tmp_path / "cache"
    prep = Preprocessor(SIZE, cache_dir=str(cache))
    fresh = prep(photo)
    (entry,) = cache.rglob(f"*{ENTRY_SUFFIX}")
    entry.write_bytes(damage(entry.read_bytes()))
    rebuilt = prep(photo)
    assert len(decodes) == 2
    assert same(fresh, rebuilt)
    arrays, box = read_entry(entry)  # the entry on disk is whole again
    assert np.array_equal(arrays["image"], fresh.image) and box == fresh.box


def masked_photo(tmp_path: Path, name: str) -> Sample:
    """A disc photograph with one mask ``name`` (a square inside the disc)."""
    image = disc_image(90, 120, (60, 45), 40)
    mask = np.zeros((90, 120), np.uint8)
    mask[30:60, 45:75] = 255
    return Sample(
        "s",
        "s",
        str(write_png(tmp_path / "photo.png", image)),
        "train",
        masks={name: str(write_png(tmp_path / f"{name}.png", mask))},
    )


def test_a_hit_reads_back_the_arrays_bit_identical_and_writable(tmp_path: Path):
    sample = masked_photo(tmp_path, "a")
    cache = str(tmp_path / "cache")
    fresh = Preprocessor(SIZE, cache_dir=None)(sample, ["a"])
    Preprocessor(SIZE, cache_dir=cache)(sample, ["a"])  # fills the cache
    hit = Preprocessor(SIZE, cache_dir=cache)(sample, ["a"])
    for a, b in [(fresh.image, hit.image), (fresh.masks["a"], hit.masks["a"])]:
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        assert b.flags.writeable  # like a fresh array: in-place augmentation must not fail
    assert hit.box == fresh.box and isinstance(hit.box[0], int)


def test_a_source_of_its_own_size_is_cached_at_it_and_prepared_at_the_working_size(tmp_path: Path):
    sample = dataclasses.replace(masked_photo(tmp_path, "a"), source="big", points={"p": (60, 45)})
    cache = tmp_path / "cache"
    own = Preprocessor(SIZE, cache_dir=str(cache), source_sizes={"big": 2 * SIZE})(sample, ["a"])
    direct = Preprocessor(SIZE, cache_dir=None)(sample, ["a"])
    (entry,) = cache.rglob(f"*{ENTRY_SUFFIX}")
    assert {a.shape[0] for a in read_entry(entry)[0].values()} == {2 * SIZE}
    assert own.image.shape == direct.image.shape and own.masks["a"].shape == (SIZE, SIZE)
    # The same region at the same place: only the resampling differs.
    assert (own.box, own.points, own.pixel_scale) == (direct.box, direct.points, direct.pixel_scale)
    blocks = lambda image: image.reshape(8, SIZE // 8, 8, SIZE // 8, 3).mean(axis=(1, 3))  # noqa: E731
    assert np.abs(blocks(own.image) - blocks(direct.image)).max() < 3  # the texture aside
    assert (own.masks["a"] != direct.masks["a"]).mean() < 0.02


def test_an_entry_of_another_cache_version_is_a_miss(
    photo: Sample, tmp_path: Path, decodes: list[str], monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(preprocess, "CACHE_VERSION", preprocess.CACHE_VERSION - 1)
        Preprocessor(SIZE, cache_dir=str(cache))(photo)
    Preprocessor(SIZE, cache_dir=str(cache))(photo)
    assert len(decodes) == 2
    assert len(list(cache.rglob(f"*{ENTRY_SUFFIX}"))) == 2


def test_masks_are_cached_with_the_image(tmp_path: Path, decodes: list[str]):
    sample = masked_photo(tmp_path, "disc")
    prep = Preprocessor(SIZE, cache_dir=str(tmp_path / "cache"))
    first, second = prep(sample, ["disc"]), prep(sample, ["disc"])
    assert len(decodes) == 1 and same(first, second)
    assert first.masks["disc"].dtype == np.uint8 and set(np.unique(first.masks["disc"])) == {0, 1}


def test_entries_are_written_atomically(
    photo: Sample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "cache"
    Preprocessor(SIZE, cache_dir=str(cache))(photo)
    assert [p.suffix for p in cache.rglob("*") if p.is_file()] == [ENTRY_SUFFIX]

    def crash(*args: object) -> None:
        raise OSError("disk full")

    other = Sample("t", "t", photo.image, "train")
    monkeypatch.setattr(io_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        Preprocessor(SIZE, clahe=True, cache_dir=str(cache))(other)
    # Neither a partial entry nor a temporary file is left behind.
    assert [p.suffix for p in cache.rglob("*") if p.is_file()] == [ENTRY_SUFFIX]


# --------------------------------------------------------------------------- content, not stat


def rewrite_in_place(path: Path, image: np.ndarray) -> None:
    """Replace the pixels of the BMP at ``path`` by ``image`` (same shape, so the same size) and
    restore its modification time: only the content (and the inode change time) differs."""
    before = os.stat(path)
    Image.fromarray(image).save(path, format="BMP")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.fixture
def bmp_photo(tmp_path: Path) -> Sample:
    path = tmp_path / "photo.bmp"
    Image.fromarray(disc_image(90, 120, (60, 45), 40)).save(path, format="BMP")
    return Sample("s", "s", str(path), "train")


def test_an_image_rewritten_with_its_size_and_modification_time_is_a_miss(
    bmp_photo: Sample, tmp_path: Path, decodes: list[str], monkeypatch: pytest.MonkeyPatch
):
    cache = str(tmp_path / "cache")
    before = Preprocessor(SIZE, cache_dir=cache)(bmp_photo)
    rewrite_in_place(Path(bmp_photo.image), disc_image(90, 120, (60, 45), 30))
    monkeypatch.setattr(io_module, "_DIGESTS", {})  # a new run starts without them
    after = Preprocessor(SIZE, cache_dir=cache)(bmp_photo)  # as a new run would
    assert len(decodes) == 2 and not np.array_equal(before.image, after.image)
    assert same(after, Preprocessor(SIZE, cache_dir=None)(bmp_photo))


def test_an_image_moved_elsewhere_still_hits_the_cache(
    bmp_photo: Sample, tmp_path: Path, decodes: list[str]
):
    cache = str(tmp_path / "cache")
    Preprocessor(SIZE, cache_dir=cache)(bmp_photo)
    moved = Path(bmp_photo.image).rename(tmp_path / "moved.bmp")
    Preprocessor(SIZE, cache_dir=cache)(Sample("s", "s", str(moved), "train"))
    assert decodes == [bmp_photo.image]  # keyed on the content, not on the path


def test_the_pre_scan_checks_an_image_rewritten_in_place_again(
    bmp_photo: Sample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = str(tmp_path / "cache")
    assert Preprocessor(SIZE, cache_dir=cache).bad_images([bmp_photo]) == {}
    path = Path(bmp_photo.image)
    before = os.stat(path)
    path.write_bytes(b"\0" * before.st_size)  # same size, no longer an image
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    monkeypatch.setattr(io_module, "_DIGESTS", {})  # a new run starts without them
    bad = Preprocessor(SIZE, cache_dir=cache).bad_images([bmp_photo])
    assert list(bad) == ["s"] and "cannot be decoded" in bad["s"]


def test_masks_of_another_size_than_their_image_are_named(tmp_path: Path):
    good = masked_photo(tmp_path, "disc")
    small = write_png(tmp_path / "small.png", np.full((45, 60), 255, np.uint8))
    bad = Sample(
        "b", "b", good.image, "train", masks={"disc": str(small), "cup": good.masks["disc"]}
    )
    gone = Sample("g", "g", good.image, "train", masks={"disc": str(tmp_path / "gone.png")})
    found = preprocess.mask_problems([good, bad, gone], ["disc", "cup"])
    assert found == {
        "b": "mask 'disc' is 60x45, the image 120x90",
        "g": f"mask 'disc' cannot be read (image file {tmp_path / 'gone.png'} does not exist; "
        "check the dataset root)",
    }
    assert preprocess.mask_problems([bad], ["cup"]) == {}  # only the masks asked for
