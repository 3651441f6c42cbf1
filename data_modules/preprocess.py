"""Preprocessing: field-of-view crop, resize to the working resolution, optional contrast
enhancement, and a persistent on-disk cache so each photograph is decoded once, not every epoch.

A data source may be preprocessed at a size of its own (``data.sources.<name>.preprocess_size``):
its images are cropped, enhanced and cached at that size, then resized to the working size
``data.image_size`` when read. Only preprocessing, because the images of a batch must share a
shape, and the trained network is run by ``predict`` and ``export`` at one input size on images
whose source nobody knows: a source trained at a working size of its own would be scored there
at a scale it never saw. What a source's size changes is the detail its images keep (below the
working size, only what that size holds: a sharp source matched to a soft one the network also
sees) and the cache entries it shares (keyed on the size they were made at: a 384 px teacher
run and a 256 px student run, the source at 384 px, decode and crop its originals once).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from data_modules.io import (
    NPZ_SEPARATOR,
    atomic_write_bytes,
    is_npz_ref,
    load_image,
    load_mask,
    ref_digest,
)
from data_modules.samples import Sample

#: version of the cache entries' content and layout: a new one makes every old entry a miss
CACHE_VERSION = 2
#: pixels darker than this (0-255, max over channels) are outside the field of view
FOV_THRESHOLD = 20
#: version of ``Preprocessor.bad_images``'s check: a new one redoes every image (2: keyed on
#: the file's content, not its path, size and modification time)
IMAGE_CHECK = 2
#: file in the cache folder listing the keys of the images that passed the check
CHECKED_IMAGES = "checked_images.json"
#: file name ending of a cache entry (``write_entry``); version-1 entries were ``.npz`` files
ENTRY_SUFFIX = ".prep"
#: the steps besides resizing, each switched by ``data.preprocess.<step>``; none can be undone
#: from the preprocessed image
STEPS = ("fov_crop", "clahe", "local_mean")


def source_sizes(data_cfg: Any) -> dict[str, int]:
    """Data source -> the side its images are preprocessed at, for the sources whose
    ``preprocess_size`` differs from the working size ``data.image_size`` (the others are
    preprocessed at the working size): what the preprocessor uses and the teacher cache's
    fingerprint records. A checkpoint saved before the key existed has none: the working size."""
    working = int(data_cfg.image_size)
    sizes = {str(n): src.get("preprocess_size") for n, src in data_cfg.sources.items()}
    return {n: int(s) for n, s in sizes.items() if s is not None and int(s) != working}


def preprocess_steps(preprocess: Any) -> dict[str, bool]:
    """Which ``STEPS`` ``preprocess`` (a ``data.preprocess`` config, or a ``Preprocessor``)
    applies: the one description of them that the preprocessing cache key, the teacher cache's
    fingerprint and an export's metadata record."""
    return {step: bool(getattr(preprocess, step)) for step in STEPS}


@dataclass
class Prepared:
    """A sample at the working resolution, whatever size its source is preprocessed at. Points
    are normalised to [0,1]; ``pixel_scale`` is the width and height, in original pixels, of the
    region the normalised coordinates span; ``box`` is that region (x0, y0, width, height), which
    ``uncrop`` maps predictions back through."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    points: dict[str, tuple[float, float]]
    pixel_scale: tuple[float, float]
    box: tuple[int, int, int, int]


def original_size(ref: str) -> tuple[int, int]:
    """(width, height) of the stored image without decoding its pixels."""
    if is_npz_ref(ref):
        arr = load_image(ref)
        return arr.shape[1], arr.shape[0]
    with Image.open(ref) as img:
        return img.size


def _mask_size(ref: str) -> tuple[int, int]:
    """(width, height) of a mask: from its header, else decoded (a TIFF only tifffile reads)."""
    try:
        return original_size(ref)
    except (OSError, ValueError):
        mask = load_mask(ref)
        return mask.shape[1], mask.shape[0]


def mask_problems(samples: list[Sample], names: list[str]) -> dict[str, str]:
    """sample_id -> how its masks among ``names`` fail to cover its image pixel for pixel (a
    size differing from the image's, an unreadable file), from the file headers: every such
    sample is named before any work instead of failing mid-epoch when it is first read. An
    image that cannot be read is left to ``Preprocessor.bad_images``."""
    found = {}
    for sample in samples:
        wanted = [n for n in names if n in sample.masks]
        if not wanted:
            continue
        try:
            width, height = original_size(sample.image)
        except (OSError, ValueError):
            continue
        problems = []
        for name in wanted:
            try:
                w, h = _mask_size(sample.masks[name])
            except (OSError, ValueError) as exc:
                problems.append(
                    f"mask {name!r} cannot be read ({exc.args[0] if exc.args else exc})"
                )
                continue
            if (w, h) != (width, height):
                problems.append(f"mask {name!r} is {w}x{h}, the image {width}x{height}")
        if problems:
            found[sample.sample_id] = "; ".join(problems)
    return found


def fov_region(image: np.ndarray) -> np.ndarray:
    """H x W bool: the pixels bright enough to lie inside the field of view."""
    return image.max(axis=2) > FOV_THRESHOLD


def fov_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """Square box (x0, y0, side, side) around the bright field of view; may extend past the
    image, where it is padded with black. Falls back to the whole image when nothing is dark."""
    h, w = image.shape[:2]
    bright = fov_region(image)
    rows = np.flatnonzero(bright.mean(axis=1) > 0.02)
    cols = np.flatnonzero(bright.mean(axis=0) > 0.02)
    if len(rows) == 0 or len(cols) == 0:
        y0, y1, x0, x1 = 0, h, 0, w
    else:
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(y1 - y0, x1 - x0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return int(round(cx - side / 2)), int(round(cy - side / 2)), int(side), int(side)


def crop_resize(
    arr: np.ndarray, box: tuple[int, int, int, int], size: int, resample: int
) -> np.ndarray:
    """Cut ``box`` out of ``arr`` (black outside it) and resize to ``size`` x ``size``."""
    x0, y0, bw, bh = box
    h, w = arr.shape[:2]
    canvas = np.zeros((bh, bw, *arr.shape[2:]), dtype=arr.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + bw, w), min(y0 + bh, h)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return np.asarray(Image.fromarray(canvas).resize((size, size), resample))


def resize_mask(mask: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A {0,1} uint8 mask cut to ``box`` and resized to ``size`` bilinear, then thresholded at
    one half: a thin structure keeps its width, where a nearest resize would break it up."""
    return (crop_resize(mask * 255, box, size, Image.BILINEAR) >= 128).astype(np.uint8)


def uncrop(maps: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """The inverse of ``crop_resize`` for float maps: C x size x size at the working resolution
    -> C x ``height`` x ``width`` on the original pixel grid, bilinear. Pixel centres map onto
    pixel centres (the convention of PIL's resize); past the box's edge the edge values
    continue (those pixels lie outside the field of view, which evaluation leaves out)."""
    x0, y0, bw, bh = box
    sx, sy = maps.shape[2] / bw, maps.shape[1] / bh
    # original pixel x (centre x + 0.5) -> map pixel (x + 0.5 - x0) * sx - 0.5
    to_map = np.array([[sx, 0, (0.5 - x0) * sx - 0.5], [0, sy, (0.5 - y0) * sy - 0.5]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return np.stack(
        [
            cv2.warpAffine(
                m.astype(np.float32),
                to_map,
                (width, height),
                flags=flags,
                borderMode=cv2.BORDER_REPLICATE,
            )
            for m in maps
        ]
    )


def _file_key(digests: tuple[str, ...], settings: dict[str, Any]) -> str:
    """Digest of files' contents (``ref_digest``) plus ``settings``, the key of everything
    cached here: an edited file (even one rewritten with the same size and a restored
    modification time) or a changed setting is a miss; a moved file still hits."""
    key = json.dumps({"files": digests, **settings}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()


def _image_problem(ref: str, draft_size: int) -> str | None:
    """Why the image ``ref`` cannot be used, or None. The pixels are decoded: only a decode
    finds a truncated file, whose header reads fine."""
    if os.path.getsize(ref.split(NPZ_SEPARATOR, 1)[0] if is_npz_ref(ref) else ref) == 0:
        return f"image file {ref} is empty (0 bytes)"
    try:
        load_image(ref, draft_size=draft_size)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return str(exc.args[0] if exc.args else exc)
    return None


def enhance(image: np.ndarray, clahe: bool, local_mean: bool) -> np.ndarray:
    """Optional contrast enhancement: CLAHE on lightness, or Graham's local-mean subtraction."""
    if clahe:
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        lab[..., 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(lab[..., 0])
        image = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    if local_mean:
        fov = image.max(axis=2, keepdims=True) > FOV_THRESHOLD
        blur = cv2.GaussianBlur(image, (0, 0), sigmaX=image.shape[0] / 30)
        image = np.where(fov, cv2.addWeighted(image, 4, blur, -4, 128), 0).astype(np.uint8)
    return image


def write_entry(path: Path, arrays: dict[str, np.ndarray], box: tuple[int, int, int, int]) -> None:
    """Store ``arrays`` and ``box`` as one cache entry (``read_entry``), atomically."""
    layout = [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]
    header = json.dumps({"box": [int(v) for v in box], "arrays": layout}).encode()
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    atomic_write_bytes(path, header + b"\n" + payload)


def read_entry(path: Path) -> tuple[dict[str, np.ndarray], tuple[int, int, int, int]]:
    """The arrays (writable, bit-identical to those written) and box of one cache entry. Raises
    ValueError when the file is shorter or longer than its header says (a truncated file). The
    file is read straight into the one buffer the arrays share: a fresh copy per sample costs
    as much as parsing the header."""
    with open(path, "rb", buffering=0) as fh:
        data = bytearray(os.fstat(fh.fileno()).st_size)
        fh.readinto(data)
    start = data.index(b"\n") + 1
    meta = json.loads(data[:start])
    arrays, offset = {}, start
    for name, dtype, shape in meta["arrays"]:
        arr = np.frombuffer(data, np.dtype(dtype), math.prod(shape), offset).reshape(shape)
        arrays[name] = arr
        offset += arr.nbytes
    if offset != len(data):
        raise ValueError(f"cache entry {path}: {len(data)} bytes, the header describes {offset}")
    x0, y0, w, h = (int(v) for v in meta["box"])
    return arrays, (x0, y0, w, h)


class Preprocessor:
    """Turns Samples into ``Prepared`` arrays, through a persistent cache when ``cache_dir`` is set.

    Cache key: the image's and masks' content digests (``data_modules.io.ref_digest``) plus the
    preprocessing settings, so an edited file or changed setting is a miss. Entries are written atomically;
    an unreadable entry is rebuilt. Each entry is one file, uncompressed: a JSON header line
    (the box, each array's name, dtype and shape) and the arrays' raw bytes. A warm epoch reads
    every entry, and parsing one small header costs ~0.02 ms where an .npz's zip directory and
    per-array .npy headers cost ~0.2 ms, as much as the augmentation call itself.

    ``size`` is the working size of every ``Prepared``; ``source_sizes`` (``source_sizes``)
    names the data sources preprocessed and cached at another size, whose arrays are resized to
    ``size`` on each read (384 to 256 px: about 1 ms per image and 0.5 ms per mask on one core).
    """

    def __init__(
        self,
        size: int,
        fov_crop: bool = True,
        clahe: bool = False,
        local_mean: bool = False,
        cache_dir: str | None = None,
        source_sizes: dict[str, int] | None = None,
    ) -> None:
        self.size = size
        self.fov_crop = fov_crop
        self.clahe = clahe
        self.local_mean = local_mean
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.source_sizes = dict(source_sizes or {})
        #: entry files by ``_entry_path``'s key: one small item per sample and file version
        self._paths: dict[tuple[Any, ...], Path] = {}

    def settings(self, size: int) -> dict[str, Any]:
        """What a cache entry made at ``size`` depends on besides the files: its key."""
        return {"size": size, **preprocess_steps(self), "version": CACHE_VERSION}

    def __call__(self, sample: Sample, mask_names: list[str] | None = None) -> Prepared:
        names = sorted(
            set(mask_names if mask_names is not None else sample.masks) & set(sample.masks)
        )
        size = self.source_sizes.get(sample.source, self.size)
        image, masks, box = self._pixels(sample, names, size)
        if size != self.size:
            whole = (0, 0, size, size)
            image = crop_resize(image, whole, self.size, Image.BILINEAR)
            masks = {name: resize_mask(mask, whole, self.size) for name, mask in masks.items()}
        x0, y0, bw, bh = box
        points = {k: ((x - x0) / bw, (y - y0) / bh) for k, (x, y) in sample.points.items()}
        return Prepared(image, masks, points, (float(bw), float(bh)), box)

    def _pixels(self, sample: Sample, names: list[str], size: int):
        """Image, masks and box of ``sample`` at ``size``, from the cache when it has them."""
        if self.cache_dir is None:
            return self._compute(sample, names, size)
        path = self._entry_path(sample, names, size)
        try:
            return self._read_entry(path, names)
        except FileNotFoundError:
            pass  # not cached yet
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # corrupt (e.g. a crash mid-copy): rebuild
        result = self._compute(sample, names, size)
        self._write_entry(path, *result, names)
        return result

    def _compute(self, sample: Sample, names: list[str], size: int):
        width, height = original_size(sample.image)
        decoded = load_image(sample.image, draft_size=size * 2)
        ratio = width / decoded.shape[1]
        small_box = (
            fov_box(decoded) if self.fov_crop else (0, 0, decoded.shape[1], decoded.shape[0])
        )
        box = tuple(int(round(v * ratio)) for v in small_box)
        image = enhance(
            crop_resize(decoded, small_box, size, Image.BILINEAR), self.clahe, self.local_mean
        )
        masks = {}
        for name in names:
            mask = load_mask(sample.masks[name])
            if mask.shape != (height, width):
                raise ValueError(
                    f"sample {sample.sample_id}: mask {name!r} is {mask.shape[1]}x{mask.shape[0]} "
                    f"but the image is {width}x{height}"
                )
            masks[name] = resize_mask(mask, box, size)
        return image, masks, box

    def _entry_path(self, sample: Sample, names: list[str], size: int) -> Path:
        """The entry's file. Its digest is remembered per file contents and settings: a warm
        epoch asks once per sample, and hashing the key cost as much as reading the entry (the
        files' own digests are hashed once per process, ``file_digest``)."""
        digests = tuple(
            ref_digest(ref) for ref in [sample.image, *(sample.masks[n] for n in names)]
        )
        settings = self.settings(size)
        memo = (digests, tuple(names), *settings.values())
        if memo not in self._paths:
            digest = _file_key(digests, {"masks": names, **settings})
            self._paths[memo] = self.cache_dir / digest[:2] / f"{digest}{ENTRY_SUFFIX}"
        return self._paths[memo]

    def bad_images(self, samples: list[Sample]) -> dict[str, str]:
        """sample_id -> why its image cannot be used (missing, empty, not decodable), for every
        sample at once: a bad file is named before any work instead of failing mid-epoch. JPEGs
        decode at reduced scale, which is cheap; with a cache folder, the content digests of the
        images that passed are kept in it (keyed like the entries), so an unchanged file is
        decoded once and only hashed after that."""
        record = self.cache_dir / CHECKED_IMAGES if self.cache_dir else None
        try:
            passed = set(json.loads(record.read_text())) if record else set()
        except (OSError, ValueError):
            passed = set()  # none yet, or unreadable: check every image again
        bad: dict[str, str] = {}
        new = set()
        for sample in samples:
            try:
                key = _file_key((ref_digest(sample.image),), {"check": IMAGE_CHECK})
            except OSError as exc:
                bad[sample.sample_id] = f"image file {sample.image}: {exc.strerror or exc}"
                continue
            if key in passed:
                continue
            problem = _image_problem(sample.image, self.size * 2)
            if problem is None:
                new.add(key)
            else:
                bad[sample.sample_id] = problem
        if record is not None and new:
            atomic_write_bytes(record, json.dumps(sorted(passed | new)).encode())
        return bad

    @staticmethod
    def _read_entry(path: Path, names: list[str]):
        arrays, box = read_entry(path)
        return arrays["image"], {n: arrays[f"mask_{n}"] for n in names}, box

    @staticmethod
    def _write_entry(path: Path, image, masks, box, names: list[str]) -> None:
        write_entry(path, {"image": image, **{f"mask_{n}": masks[n] for n in names}}, box)
