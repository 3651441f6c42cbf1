"""Helpers shared by the dataset adapters: tolerant CSV reading, image lookup, derived masks.

Official CSVs come with quirks (a UTF-8 BOM, trailing spaces in column names, trailing empty
columns, empty trailing rows); ``read_csv`` absorbs them once for every adapter. Masks that an
adapter has to derive from image content (a FOV, a binarised soft map) are written once, atomically,
into a cache folder mtkd owns (``derived_root``, never beside the dataset) and referenced by path
like any official mask.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from data_modules.io import IMAGE_SUFFIXES, atomic_write_bytes, file_digest

#: PNG text key of a derived mask: the content digest of the file it was derived from
SOURCE_DIGEST = "mtkd-source-digest"


class Row(dict):
    """One CSV row keyed by the requested column names; remembers its file and line for errors."""

    def __init__(self, values: dict[str, str], path: Path, line: int) -> None:
        super().__init__(values)
        self.path = path
        self.line = line

    def number(self, column: str) -> float:
        try:
            return float(self[column])
        except ValueError:
            raise ValueError(
                f"{self.path} line {self.line}: {column} = {self[column]!r} is not a number; "
                "fix the cell or remove the row"
            ) from None


def _normalise(column: str) -> str:
    return "".join(column.split()).lower()


def read_csv(path: Path, columns: Iterable[str], optional: Iterable[str] = ()) -> list[Row]:
    """Rows of a CSV holding ``columns`` (required) and ``optional`` columns where present.

    Column names match case- and whitespace-insensitively; unnamed columns and empty rows are
    skipped; cells are stripped.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"expected the CSV file {path.name!r} in {path.parent}, but it is missing; "
            "restore it from the dataset download"
        )
    with path.open(newline="", encoding="utf-8-sig") as fh:
        header, *body = list(csv.reader(fh)) or [[]]
    position = {_normalise(name): i for i, name in enumerate(header) if name.strip()}
    missing = [c for c in columns if _normalise(c) not in position]
    if missing:
        found = [name.strip() for name in header if name.strip()]
        raise ValueError(f"{path} lacks column(s) {missing}; its columns are {found}")
    wanted = [*columns, *(c for c in optional if _normalise(c) in position)]
    rows = []
    for line, cells in enumerate(body, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        values = {c: _cell(cells, position[_normalise(c)]) for c in wanted}
        rows.append(Row(values, path, line))
    return rows


def _cell(cells: list[str], index: int) -> str:
    return cells[index].strip() if index < len(cells) else ""


def find_csv(folder: Path, pattern: str, required: bool = True) -> Path | None:
    """The one CSV in ``folder`` matching the glob ``pattern`` (file names vary between downloads)."""
    matches = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if len(matches) > 1:
        raise ValueError(
            f"several files in {folder} match {pattern!r}: {[m.name for m in matches]}; keep one"
        )
    if not matches and required:
        raise FileNotFoundError(
            f"expected a CSV file matching {pattern!r} in {folder}, found none; "
            "restore it from the dataset download"
        )
    return matches[0] if matches else None


def image_stem(name: str) -> str:
    """A file name as written in a CSV, without its image extension (if it has one)."""
    path = Path(name)
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else name


def image_index(folder: Path) -> dict[str, Path]:
    """Image files directly in ``folder`` by file stem, sorted; the folder must exist."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"expected the image folder {folder}, but it does not exist; check the dataset root"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return {p.stem: p for p in files}


def require_image(
    images: dict[str, Path], name: str, listed_in: str | Path, where: str | Path
) -> Path:
    """The image a CSV row names; a missing file is an error that names it."""
    stem = image_stem(name)
    if stem not in images:
        raise FileNotFoundError(
            f"image {name!r} is listed in {listed_in} but is missing from {where}; "
            "restore the file or remove its row"
        )
    return images[stem]


def existing(candidates: dict[str, Path]) -> dict[str, str]:
    """The candidate files that exist, as path strings (an absent optional mask is no error)."""
    return {name: str(path) for name, path in candidates.items() if path.is_file()}


def derived_root() -> Path:
    """The folder mtkd owns for files it derives from a dataset: ``MTKD_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/mtkd`` (``~/.cache/mtkd``). Never beside the data, which may be a
    read-only mount and is not mtkd's to write into."""
    if os.environ.get("MTKD_CACHE_DIR"):
        return Path(os.environ["MTKD_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mtkd"


def cache_dir(root: Path, option: str | Path | None, folder: str, dataset: str) -> Path:
    """Where derived masks go: ``option`` if given, else ``<derived_root()>/<folder>/<dataset>-
    <digest of root>``, one folder per copy of the dataset."""
    if option:
        return Path(option).expanduser()
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return derived_root() / folder / f"{dataset}-{digest}"


def _derived_from(mask: Path) -> str | None:
    """The source digest a derived mask records (``cached_masks``), None for none or no file."""
    try:
        with Image.open(mask) as img:
            return img.info.get(SOURCE_DIGEST)
    except (OSError, ValueError):
        return None


def cached_masks(
    source: Path, outputs: dict[str, Path], derive: Callable[[Path], dict[str, np.ndarray]]
) -> dict[str, str]:
    """Paths of the masks ``derive(source)`` computes, written (PNG 0/255, atomically) unless
    copies derived from the same content of ``source`` are there: each records the source's
    ``file_digest`` in a PNG text chunk, so a source rewritten in place (same size, restored
    modification time) is derived again."""
    digest = file_digest(source)
    if any(_derived_from(out) != digest for out in outputs.values()):
        info = PngInfo()
        info.add_text(SOURCE_DIGEST, digest)
        for name, mask in derive(source).items():
            buf = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", pnginfo=info)
            atomic_write_bytes(outputs[name], buf.getvalue())
    return {name: str(out) for name, out in outputs.items()}


def read_gray(path: Path) -> np.ndarray:
    """A label image as one uint8 channel."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))
