"""The project's manifest CSV: any dataset can be written to it and read back.

Columns: ``sample_id, patient_id, split, image`` then, per annotation,
``label:<name>`` (a number), ``mask:<name>`` (path to a binary mask image) and
``point:<name>:x`` / ``point:<name>:y`` (pixels of the original image) and ``text:<name>`` (a free
text, e.g. a written diagnosis). Paths are relative to the
CSV's folder. An empty cell means "no label for this sample".
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable
from pathlib import Path

from data_modules.io import atomic_write_bytes
from data_modules.samples import Sample, register_source

BASE_COLUMNS = ("sample_id", "patient_id", "split", "image")
MANIFEST_NAME = "manifest.csv"
#: accepted ``split`` cells (after trimming and lower-casing) -> split; ``validation`` is a common
#: spelling of val. Anything else is refused: a silently dropped row would shrink a split.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def _resolve(base: Path, value: str) -> str:
    if "#" in value or Path(value).is_absolute():
        return value
    return str(base / value)


def _climbing(value: str) -> bool:
    """A relative path that leads out of the manifest's folder (``../../x.jpg``): most often a
    manifest copied to another folder, whose rows then name other files than the author meant.
    Read from the path's text: a symlinked folder inside it is the user's choice, and resolving
    every path on disk cost ~0.7 s per read of a 600-image manifest."""
    if "#" in value or Path(value).is_absolute():
        return False
    return Path(os.path.normpath(value)).parts[0] == os.pardir


def read_manifest(path: str | Path, allow_outside_root: bool = False) -> list[Sample]:
    """Read a manifest CSV into Sample records, with row numbers in every error. A relative
    image or mask path that climbs out of the manifest's folder is refused, listing every such
    row, unless ``allow_outside_root`` (absolute paths are taken as they are)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist")
    base = path.parent
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in BASE_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"manifest {path} lacks columns {missing}; it has {header}")
        rows = list(reader)
    samples, outside = [], []
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        labels, masks, points, texts = {}, {}, {}, {}
        for col, value in row.items():
            if not value or col in BASE_COLUMNS:
                continue
            kind, _, name = col.partition(":")
            if kind == "label":
                labels[name] = _number(value, path, line, col)
            elif kind == "mask":
                masks[name] = _resolve(base, value)
                if _climbing(value):
                    outside.append(f"  line {line}: {col}={value!r}")
            elif kind == "text":
                texts[name] = value
            elif kind == "point":
                pname, _, axis = name.rpartition(":")
                if axis not in ("x", "y"):
                    raise ValueError(f"manifest {path}: column {col!r} must end in ':x' or ':y'")
                points.setdefault(pname, {})[axis] = _number(value, path, line, col)
            elif kind:
                raise ValueError(
                    f"manifest {path}: unknown column {col!r}; use sample_id, patient_id, split, "
                    "image, label:<name>, mask:<name>, point:<name>:x, point:<name>:y, text:<name>"
                )
        for pname, xy in points.items():
            if set(xy) != {"x", "y"}:
                raise ValueError(f"manifest {path} line {line}: point {pname!r} needs both x and y")
        if _climbing(row["image"]):
            outside.append(f"  line {line}: image={row['image']!r}")
        split = row["split"].lower()
        if split and split not in SPLIT_NAMES:
            raise ValueError(
                f"manifest {path} line {line}: split={row['split']!r} is not a split; use one of "
                f"{sorted(SPLIT_NAMES)} (any case), or leave it empty to have it assigned"
            )
        samples.append(
            Sample(
                sample_id=row["sample_id"],
                patient_id=row["patient_id"] or row["sample_id"],
                image=_resolve(base, row["image"]),
                split=SPLIT_NAMES.get(split),
                labels=labels,
                masks=masks,
                points={k: (v["x"], v["y"]) for k, v in points.items()},
                texts=texts,
                origin=f"{path} line {line}",
            )
        )
    if outside and not allow_outside_root:
        shown = "\n".join(outside[:20]) + (
            f"\n  ... {len(outside) - 20} more" if len(outside) > 20 else ""
        )
        raise ValueError(
            f"manifest {path}: {len(outside)} path(s) lead out of its folder {base}; fix them, or "
            "allow it with data.sources.<source>.options.allow_outside_root=true:\n" + shown
        )
    return samples


def _number(value: str, path: Path, line: int, col: str) -> float:
    """A finite number: a ``nan`` label would turn every monitored metric into NaN."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"manifest {path} line {line}: {col}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(
            f"manifest {path} line {line}: {col}={value!r} is not a finite number; leave the "
            "cell empty for a missing label"
        )
    return number


def write_manifest(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples to a manifest CSV atomically; paths are stored relative to its folder."""
    path = Path(path)
    samples = list(samples)
    base = path.parent.resolve()

    def rel(value: str) -> str:
        if "#" in value:
            return value
        p = Path(value).resolve()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    label_cols = sorted({f"label:{k}" for s in samples for k in s.labels})
    mask_cols = sorted({f"mask:{k}" for s in samples for k in s.masks})
    point_names = sorted({k for s in samples for k in s.points})
    point_cols = [f"point:{p}:{a}" for p in point_names for a in ("x", "y")]
    text_cols = sorted({f"text:{k}" for s in samples for k in s.texts})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*BASE_COLUMNS, *label_cols, *mask_cols, *point_cols, *text_cols])
    for s in samples:
        row = [s.sample_id, s.patient_id, s.split or "", rel(s.image)]
        row += [_fmt(s.labels.get(c.split(":", 1)[1])) for c in label_cols]
        row += [rel(s.masks[c[5:]]) if c[5:] in s.masks else "" for c in mask_cols]
        for p in point_names:
            xy = s.points.get(p)
            row += [f"{xy[0]:.3f}", f"{xy[1]:.3f}"] if xy else ["", ""]
        row += [s.texts.get(c[5:], "") for c in text_cols]
        writer.writerow(row)
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


@register_source("manifest")
def manifest_source(
    root: Path, file: str = MANIFEST_NAME, allow_outside_root: bool = False
) -> list[Sample]:
    """Source kind ``manifest``: ``root`` is the folder holding the CSV (or the CSV itself);
    ``allow_outside_root`` takes relative paths that climb out of it (``read_manifest``)."""
    return read_manifest(root if root.is_file() else root / file, allow_outside_root)
