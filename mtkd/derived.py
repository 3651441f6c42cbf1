"""Measures derived from a run's predicted masks and points: what a clinician reads (a vertical
cup-to-disc ratio, lesion counts and areas, lesions near the fovea) rather than a head's guess.

A measure is a plain function registered by name (``@register_measure``). Its parameters before
``*`` are its inputs, each a ``Mask`` (H x W bool at the working size: a segmentation class's
probability >= 0.5, as ``Task.overlay`` draws it) or a ``Point`` ((x, y) normalised to the image,
pixel-centre convention); its keyword-only parameters are options. A config entry

    derived:
      cdr_from_masks: {measure: vertical_cdr, disc: anatomy.optic_disc, cup: anatomy.optic_cup,
                       label: cdr}

names the measure, each input's source ``<task>.<layer>`` (a mask or point the task draws), the
options, and optionally the ``label`` that ``mtkd evaluate`` scores it against (MAE, R²).
``mtkd predict`` prints every entry per image; ``mtkd export`` lists them in metadata.json.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from scipy import ndimage

from data_modules.registry import Registry
from mtkd.config import ConfigError, recompose, to_container
from mtkd.tasks import Overlay, Task

#: H x W bool: the pixels of one class (probability >= 0.5)
Mask = np.ndarray
#: (x, y) normalised to the image, (0, 0) the top-left corner, pixel-centre convention
Point = tuple[float, float]
#: what a config entry's input may name: an ``Overlay`` field per annotation of the parameter
INPUT_KINDS: dict[Any, str] = {Mask: "masks", Point: "points"}
#: a config entry's keys that are not the measure's parameters
RESERVED = ("measure", "label")

MEASURES: Registry[Callable[..., float]] = Registry(
    "derived.<name>.measure", "derived measure", "@register_measure(name)"
)


def register_measure(name: str) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Function decorator: make ``name`` usable as ``derived.<entry>.measure``."""
    return MEASURES.register(name)


def _vertical_extent(mask: Mask) -> int:
    """Rows from the first to the last that hold a pixel of ``mask`` (0 when it is empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def _disc_diameter(disc: Mask) -> float:
    """The diameter of the circle of the disc mask's area, 2 sqrt(area / pi), in pixels: how the
    synthetic generator measures it for the DME risk grade."""
    return 2 * float(np.sqrt(disc.sum() / np.pi))


@register_measure("vertical_cdr")
def vertical_cdr(disc: Mask, cup: Mask) -> float:
    """Vertical cup-to-disc ratio: rows spanned by the cup / rows spanned by the disc; 0 without
    a disc. A span runs from the first to the last row with a pixel, so a fragmented mask (a cup
    cut by a vessel) counts as one structure; cup pixels outside the disc are not cup."""
    disc_rows = _vertical_extent(disc)
    return _vertical_extent(cup & disc) / disc_rows if disc_rows else 0.0


@register_measure("lesion_count")
def lesion_count(mask: Mask) -> float:
    """Connected components of the mask, 8-connected (pixels touching at a corner join)."""
    return float(ndimage.label(mask, structure=np.ones((3, 3)))[1])


@register_measure("lesion_area")
def lesion_area(mask: Mask) -> float:
    """Pixels of the mask / pixels of the image, at the working size (the FOV-cropped square)."""
    return float(mask.mean())


@register_measure("lesion_area_near_fovea")
def lesion_area_near_fovea(
    mask: Mask, disc: Mask, fovea: Point, *, diameters: float = 1.0
) -> float:
    """Pixels of the mask whose centre lies within ``diameters`` disc diameters of the fovea,
    / pixels of the image (the macular zones of DME grading: 1 and 2 diameters); the disc
    diameter is 2 sqrt(disc area / pi). 0 without a disc."""
    height, width = mask.shape
    x, y = fovea[0] * width - 0.5, fovea[1] * height - 0.5
    ys, xs = np.ogrid[:height, :width]
    near = np.hypot(xs - x, ys - y) <= diameters * _disc_diameter(disc)
    return float((mask & near).sum() / mask.size) if disc.any() else 0.0


@dataclass(frozen=True)
class DerivedMeasure:
    """One ``derived.<name>`` entry, checked against the run's tasks (``parse_derived``)."""

    name: str
    measure: str
    #: parameter -> (task, layer, ``Overlay`` field: "masks" or "points")
    inputs: dict[str, tuple[str, str, str]]
    options: dict[str, Any]
    label: str | None

    @property
    def tasks(self) -> set[str]:
        return {task for task, _, _ in self.inputs.values()}

    def __call__(self, drawn: Mapping[str, Overlay]) -> float:
        """The measure on one image, from what each task draws on it (``Task.overlay``)."""
        args = {p: getattr(drawn[t], field)[layer] for p, (t, layer, field) in self.inputs.items()}
        return float(MEASURES.get(self.measure)(**args, **self.options))

    def describe(self) -> dict[str, Any]:
        """How to compute it from the network's outputs (export metadata)."""
        return {
            "measure": self.measure,
            "inputs": {p: f"{t}.{layer}" for p, (t, layer, _) in self.inputs.items()},
            "options": self.options,
            "label": self.label,
            "formula": inspect.getdoc(MEASURES.get(self.measure)),
        }


def input_kinds(measure: str) -> dict[str, str]:
    """A measure's inputs (its parameters before ``*``) -> the ``Overlay`` field each reads."""
    fn = MEASURES.get(measure)
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters.values()
    inputs = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    unknown = [p for p in inputs if hints.get(p) not in INPUT_KINDS]
    if unknown:
        raise TypeError(
            f"derived measure {measure!r}: annotate inputs {unknown} as mtkd.derived.Mask or "
            "Point (options go after *)"
        )
    return {p: INPUT_KINDS[hints[p]] for p in inputs}


def parse_derived(raw: Mapping[str, Any], tasks: Mapping[str, Task]) -> dict[str, DerivedMeasure]:
    """The ``derived:`` entries, checked before any work: a registered measure, its parameters
    (unknown or missing ones listed), each input naming a mask or point the run's tasks draw
    (the valid ones listed). Raises ConfigError."""
    drawn = {n: t.overlay(t.empty_target(1)) for n, t in tasks.items()}
    entries = {}
    for name, entry in raw.items():
        key = f"derived.{name}"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("measure"), str):
            raise ConfigError(f"{key}: give {{measure: <name>, <input>: <task>.<layer>, ...}}")
        given = {k: v for k, v in entry.items() if k not in RESERVED}
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise ConfigError(f"{key}.label={label!r}: give the name of a label, or leave it out")
        try:
            MEASURES.check_options(entry["measure"], given, key=f"{key}.measure")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        inputs = {}
        for param, field in input_kinds(entry["measure"]).items():
            task, _, layer = str(given[param]).partition(".")
            valid = [f"{n}.{k}" for n, d in drawn.items() for k in getattr(d, field)]
            if task not in drawn or layer not in getattr(drawn[task], field):
                raise ConfigError(
                    f"{key}.{param}={given[param]!r} is not a {field[:-1]} of the run's tasks; "
                    f"give one of: {', '.join(valid) or f'(the tasks draw no {field})'}"
                )
            inputs[param] = (task, layer, field)
        options = {k: v for k, v in given.items() if k not in inputs}
        entries[name] = DerivedMeasure(name, entry["measure"], inputs, options, label)
    return entries


def saved_derived(
    cfg: DictConfig, tasks: Mapping[str, Task], overrides: Sequence[str] = ()
) -> dict[str, DerivedMeasure]:
    """The derived entries of a checkpoint's saved config, with ``derived.<name>={...}``
    overrides (``mtkd predict`` and ``mtkd export`` take no other)."""
    other = [o for o in overrides if not o.startswith("derived.")]
    if other:
        raise ConfigError(
            f"{other[0]}: this command takes derived.<name>={{measure: ..., ...}} overrides only"
        )
    merged = recompose(cfg, list(overrides)) if overrides else cfg
    return parse_derived(to_container(merged).get("derived") or {}, tasks)


def measure_image(
    tasks: Mapping[str, Task],
    derived: Mapping[str, DerivedMeasure],
    values: dict[str, torch.Tensor],
) -> dict[str, float]:
    """Every entry on one image, from its activated outputs per task (``Task.activate``)."""
    used = set().union(*(d.tasks for d in derived.values()))
    drawn = {n: tasks[n].overlay(values[n]) for n in used}
    return {name: d(drawn) for name, d in derived.items()}
