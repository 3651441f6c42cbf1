"""Sample records: the one shape every data source is turned into.

A source adapter reads a dataset in its official layout and returns ``Sample`` records. Labels
stay under the source's own names (``labels``, ``masks``, ``points``); the data config's
``label_map`` renames them to the names the task specs read, so two datasets can feed one task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_modules.registry import Registry

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One fundus photograph and whatever labels its source provides.

    ``image`` and mask values are image references understood by ``data_modules.io.load_image``:
    a file path, or ``file.npz#key/index`` for images stored inside an array file.
    ``points`` are pixel coordinates (x, y) in the original image. ``split`` is the official split
    when the source has one; ``None`` lets the data module carve train/val/test by patient.
    """

    sample_id: str
    patient_id: str
    image: str
    split: str | None = None
    labels: dict[str, float] = field(default_factory=dict)
    masks: dict[str, str] = field(default_factory=dict)
    points: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: free-text annotations (a written diagnosis), name -> text
    texts: dict[str, str] = field(default_factory=dict)
    #: where the record came from (e.g. ``manifest.csv line 12``), for error messages
    origin: str | None = None
    #: the name of the configured data source (its key under ``data.sources``) it was read from
    source: str | None = None

    def renamed(self, label_map: dict[str, str]) -> Sample:
        """Return a copy whose label, mask, point and text names pass through ``label_map``."""

        def rename(d: dict) -> dict:
            return {label_map.get(k, k): v for k, v in d.items()}

        return dataclasses.replace(
            self,
            labels=rename(self.labels),
            masks=rename(self.masks),
            points=rename(self.points),
            texts=rename(self.texts),
        )


SourceReader = Callable[..., list[Sample]]
#: the registry; the built-in sources register from the package ``__init__``, so this module
#: imports none of its plugins. A reader is called with the source's root, then its options.
SOURCES: Registry[SourceReader] = Registry(
    "data.sources.<s>.kind", "data source", "@register_source(kind)", given=1
)
_GENERATED: set[str] = set()


def register_source(kind: str, generates: bool = False) -> Callable[[SourceReader], SourceReader]:
    """Register a reader ``fn(root: Path, **options) -> list[Sample]`` under ``kind``.

    ``generates=True`` marks sources that create their folder themselves (synthetic data).
    """

    def decorate(fn: SourceReader) -> SourceReader:
        SOURCES.register(kind, fn)
        if generates:
            _GENERATED.add(kind)
        return fn

    return decorate


def source_kinds() -> list[str]:
    return SOURCES.names()


def read_source(kind: str, root: str | Path, options: dict[str, Any] | None = None) -> list[Sample]:
    """Read one configured source, with errors that name the fix."""
    reader = SOURCES.get(kind)
    options = SOURCES.check_options(kind, options or {})
    root = Path(root).expanduser()
    if not root.exists() and kind not in _GENERATED:
        raise FileNotFoundError(
            f"data source {kind!r}: folder {root} does not exist. Point the source's `root` at "
            "the dataset as downloaded (for the shared real data set MTKD_DATA_DIR)."
        )
    samples = reader(root, **options)
    if not samples:
        raise ValueError(f"data source {kind!r} at {root} produced no samples; check the layout")
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"data source {kind!r} at {root} has duplicate sample ids, e.g. {dup}")
    return samples
