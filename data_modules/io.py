"""Reading images and masks from any reference a Sample can hold."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

NPZ_SEPARATOR = "#"
#: the file endings read as photographs, wherever images are found by listing a folder
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
_UMASK = os.umask(0)
os.umask(_UMASK)
#: (path, device, inode, size, modification and inode change times) -> ``file_digest``
_DIGESTS: dict[tuple[str | int, ...], str] = {}


def npz_ref(path: str | Path, key: str, index: int) -> str:
    """Reference to image ``index`` of array ``key`` inside an ``.npz`` file."""
    return f"{path}{NPZ_SEPARATOR}{key}/{index}"


def is_npz_ref(ref: str) -> bool:
    """Whether ``ref`` names an image inside an ``.npz`` file (``npz_ref``), not a file."""
    return NPZ_SEPARATOR in ref and ref.split(NPZ_SEPARATOR, 1)[0].endswith(".npz")


def file_digest(path: str | Path) -> str:
    """blake2b digest (128 bit) of a file's bytes. The preprocessing cache, the image pre-scan
    and the teacher cache key on it: a file rewritten in place with the same size and a restored
    modification time is new content, which no ``os.stat`` field shows except the inode change
    time. So each file version (its stat, inode change time included) is hashed once per
    process, and never trusted across processes. Raises OSError for a missing file."""
    st = os.stat(path)
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def ref_digest(ref: str) -> str:
    """``file_digest`` of the file holding image reference ``ref``, plus, for an image inside an
    ``.npz`` file, its array and index (any change of that file counts for all its images)."""
    if is_npz_ref(ref):
        path, inner = ref.split(NPZ_SEPARATOR, 1)
        return f"{file_digest(path)}{NPZ_SEPARATOR}{inner}"
    return file_digest(ref)


@functools.lru_cache(maxsize=8)
def _npz_array(path: str, key: str, mtime_ns: int) -> np.ndarray:
    """One whole array of an .npz file, kept per process: an .npz member is read (and, in
    compressed files, inflated) whole, so reading it once per image costs ~50 ms each for
    RetinaMNIST. The modification time in the key makes an edited file a miss."""
    with np.load(path) as arrays:
        if key not in arrays:
            raise KeyError(f"{path} has no array {key!r}; it has {sorted(arrays.files)}")
        return arrays[key]


def _load_npz(ref: str) -> np.ndarray:
    path, inner = ref.split(NPZ_SEPARATOR, 1)
    key, index = inner.rsplit("/", 1)
    return np.array(_npz_array(path, key, os.stat(path).st_mtime_ns)[int(index)])


def _open_pil(ref: str, draft_size: int | None) -> Image.Image:
    try:
        img = Image.open(ref)
        if draft_size and img.format == "JPEG":
            # Let libjpeg decode at a reduced scale: ~10x faster for 4288x2848 photographs.
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return img
    except FileNotFoundError:
        raise FileNotFoundError(
            f"image file {ref} does not exist; check the dataset root"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(
            f"image {ref} cannot be decoded ({exc}); the file is corrupt or not an image. "
            "Replace it or remove the sample from the source."
        ) from None


def _load_tiff(ref: str) -> np.ndarray:
    import tifffile

    try:
        return np.asarray(tifffile.imread(ref))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"image file {ref} does not exist; check the dataset root"
        ) from None
    except Exception as exc:  # tifffile raises several types for damaged files
        raise ValueError(f"TIFF {ref} cannot be decoded ({exc}); the file is corrupt.") from None


def _read(ref: str, draft_size: int | None) -> np.ndarray:
    if is_npz_ref(ref):
        return _load_npz(ref)
    if ref.lower().endswith((".tif", ".tiff")):
        try:
            return np.asarray(_open_pil(ref, None))
        except ValueError:
            return _load_tiff(ref)
    img = _open_pil(ref, draft_size)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode not in ("RGB", "L", "RGBA", "I;16", "I", "F", "1"):
        img = img.convert("RGB")
    return np.asarray(img)


def load_image(ref: str, draft_size: int | None = None) -> np.ndarray:
    """Return an RGB uint8 array H x W x 3. ``draft_size`` allows fast reduced JPEG decoding."""
    arr = _read(str(ref), draft_size)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr)
    return np.ascontiguousarray(arr)


def load_mask(ref: str) -> np.ndarray:
    """Return a binary mask H x W (uint8 0/1): any non-zero pixel of the file is foreground."""
    arr = _read(str(ref), None)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    return (arr > 0).astype(np.uint8)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale 16-bit, float or boolean images into 0..255."""
    arr = arr.astype(np.float32)
    top = float(arr.max())
    scale = 255.0 if top <= 1.0 else (255.0 / top if top > 255 else 1.0)
    return np.clip(arr * scale, 0, 255).astype(np.uint8)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see
    a partial file, even if the process dies mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npy(path: str | Path, arr: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename."""
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
