"""A derived measure defined outside the library: the horizontal cup-to-disc ratio, the
vertical one's twin. Import it through ``plugins=[measure]`` (or ``MTKD_PLUGINS=measure`` for
evaluate, predict and export; this folder on PYTHONPATH) and name it in a ``derived:`` entry:
``"derived.hcdr={measure: horizontal_cdr, disc: anatomy.optic_disc, cup: anatomy.optic_cup}"``.
tests/test_derived.py checks it through the config."""

from __future__ import annotations

import numpy as np

from mtkd.derived import Mask, register_measure


def _columns(mask: Mask) -> int:
    """Columns from the first to the last that hold a pixel (0 when the mask is empty)."""
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[-1] - cols[0] + 1) if cols.size else 0


@register_measure("horizontal_cdr")
def horizontal_cdr(disc: Mask, cup: Mask, *, min_disc_px: int = 1) -> float:
    """Columns spanned by the cup inside the disc / columns spanned by the disc; 0 when the disc
    spans fewer than ``min_disc_px`` columns (an option: keyword-only, after ``*``)."""
    disc_cols = _columns(disc)
    return _columns(cup & disc) / disc_cols if disc_cols >= max(min_disc_px, 1) else 0.0
