"""``mtkd predict ckpt=PATH images=FILE|DIR [out=DIR]``: run a checkpoint on photographs.

Each image goes through the training preprocessing (field-of-view crop, resize, normalisation) so
the network sees what it was trained on. Outputs are turned into readable values: class and
probabilities, regression values, landmark points in the original photograph's pixels (mapped back
through the crop box), and mask areas: each task kind's ``Task.summarise``; and the measures
derived from the masks and points (``derived:`` in the checkpoint's config, or
``derived.<name>={...}`` arguments; ``mtkd.derived``). Also home of the overlay drawing (``Task.overlay``) shared with ``mtkd report``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_modules.io import IMAGE_SUFFIXES, atomic_write_bytes
from data_modules.preprocess import FOV_THRESHOLD, Prepared, Preprocessor
from data_modules.samples import Sample
from data_modules.transforms import build_transform
from mtkd.derived import measure_image, saved_derived
from mtkd.modules.checkpoint import load_net
from mtkd.outputs import check_output_folder, default_output
from mtkd.tasks import Frame, Task

#: the file that lists the predictions; it names the checkpoint, so it marks the folder as mtkd's
PREDICTIONS = "predictions.json"
#: ``<image file name>`` + this: the overlay PNG of each image
OVERLAY_SUFFIX = "_overlay.png"
#: a point at the original image's origin; its crop coordinates give the crop box offset
_ORIGIN = "__origin__"


def activate(tasks: dict[str, Task], outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw network outputs -> each task's readable values (``Task.activate``)."""
    return {n: t.activate(outputs[n]) for n, t in tasks.items()}


def spatial_layers(
    tasks: dict[str, Task], values: dict[str, torch.Tensor], has: dict[str, bool] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    """One sample's masks (class -> bool H x W) and points (name -> normalised (u, v)) from
    activated outputs or from targets (``Task.overlay``); tasks with ``has[name]`` False are
    left out."""
    masks: dict[str, np.ndarray] = {}
    points: dict[str, tuple[float, float]] = {}
    for name, task in tasks.items():
        if has is None or has[name]:
            drawn = task.overlay(values[name])
            masks.update(drawn.masks)
            points.update(drawn.points)
    return masks, points


def layer_colors(
    tasks: dict[str, Task],
) -> tuple[dict[str, tuple[float, ...]], dict[str, tuple[float, ...]]]:
    """A fixed colour per mask class and per point (two namespaces: a disc mask and a disc
    centre may share a name), so every panel shares one legend."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    # An empty target names every layer a task draws, before any prediction.
    layers = [t.overlay(t.empty_target(1)) for t in tasks.values()]
    masks = [n for drawn in layers for n in drawn.masks]
    points = [n for drawn in layers for n in drawn.points]
    names = [("mask", n) for n in dict.fromkeys(masks)] + [
        ("point", n) for n in dict.fromkeys(points)
    ]
    colors = {key: palette[i % len(palette)] for i, key in enumerate(names)}
    return (
        {n: c for (kind, n), c in colors.items() if kind == "mask"},
        {n: c for (kind, n), c in colors.items() if kind == "point"},
    )


def draw_overlay(
    ax: Any,
    image: np.ndarray,
    masks: dict[str, np.ndarray],
    points: dict[str, tuple[float, float]],
    colors: tuple[dict[str, tuple[float, ...]], dict[str, tuple[float, ...]]],
) -> None:
    """Image with tinted masks and point markers (normalised points, pixel-centre convention)."""
    mask_colors, point_colors = colors
    size = image.shape[0]
    tint = np.zeros((*image.shape[:2], 4))
    for name, mask in masks.items():
        tint[mask] = (*mask_colors[name][:3], 0.45)
    ax.imshow(image, interpolation="nearest")
    ax.imshow(tint, interpolation="nearest")
    for name, (u, v) in points.items():
        ax.plot(u * size - 0.5, v * size - 0.5, "X", color=point_colors[name], **_MARKER)
    ax.set_axis_off()


_MARKER = {"markeredgecolor": "white", "markersize": 9}


def legend_handles(
    colors: tuple[dict[str, tuple[float, ...]], dict[str, tuple[float, ...]]],
) -> list:
    """Legend entries for ``layer_colors``: a patch per mask class, a marker per point."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    mask_colors, point_colors = colors
    return [Patch(color=c, alpha=0.6, label=f"{n} (mask)") for n, c in mask_colors.items()] + [
        Line2D([], [], marker="X", ls="", color=c, label=f"{n} (point)", **_MARKER)
        for n, c in point_colors.items()
    ]


def find_images(images: str | Path) -> list[Path]:
    """A single image file, or the image files directly inside a folder (sorted)."""
    path = Path(images)
    if not path.exists():
        raise FileNotFoundError(f"images={path} does not exist; pass an image file or a folder")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ValueError(
            f"folder {path} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} files)"
        )
    return found


def prepare(preprocessor: Preprocessor, path: Path) -> tuple[Prepared, tuple[float, float]]:
    """Preprocess one photograph; also return the crop box origin (x0, y0) in original pixels."""
    sample = Sample(
        sample_id=path.stem, patient_id=path.stem, image=str(path), points={_ORIGIN: (0.0, 0.0)}
    )
    try:
        prep = preprocessor(sample)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read as an image: {exc}") from None
    (u0, v0), (w, h) = prep.points.pop(_ORIGIN), prep.pixel_scale
    return prep, (-u0 * w, -v0 * h)


def write_overlay(
    path: Path,
    title: str,
    image: np.ndarray,
    tasks: dict[str, Task],
    values: dict[str, torch.Tensor],
    lines: list[str],
) -> None:
    """Overlay PNG: the preprocessed image, predicted masks and points, global predictions."""
    import io
    import textwrap

    from matplotlib.figure import Figure

    masks, points = spatial_layers(tasks, values)
    colors = layer_colors(tasks)
    text = [w for line in lines for w in textwrap.wrap(line, 110, subsequent_indent=" " * 15)]
    fig = Figure(figsize=(8, 6 + 0.13 * len(text)))
    bottom = (0.13 * len(text) + 0.3) / fig.get_figheight()
    ax = fig.add_axes((0.02, bottom, 0.62, 0.92 - bottom))
    draw_overlay(ax, image, masks, points, colors)
    ax.set_title(title, fontsize=10)
    handles = legend_handles(colors)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.text(0.02, 0.02, "\n".join(text), fontsize=7, family="monospace", va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def claim_folder(out_dir: Path, ckpt: str | Path) -> None:
    """Mark ``out_dir`` as this checkpoint's before the first overlay is written: a run
    interrupted half-way leaves a predictions.json that names it (``complete: false``), so the
    rerun may replace the overlays it wrote instead of refusing them as someone else's."""
    claim = {"checkpoint": str(ckpt), "complete": False, "predictions": [], "unreadable": []}
    atomic_write_bytes(out_dir / PREDICTIONS, json.dumps(claim, indent=1).encode())


@torch.inference_mode()
def predict(
    ckpt: str | Path,
    images: str | Path,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Predict every image; print a table per image, write predictions.json and overlay PNGs.
    ``overrides``: ``derived.<name>={...}`` measures added to the checkpoint's own.

    An image that cannot be read does not cost the others their results: it is listed, with the
    reason, under ``unreadable`` in predictions.json and in the printout. Only when no image can
    be read is it an error (so the command exits non-zero).

    Default folder: ``predictions/`` beside the checkpoint's run (``mtkd.outputs``); files already
    there are replaced only when its predictions.json names this checkpoint, checked before any
    image is read."""
    files = find_images(images)
    net, tasks, cfg = load_net(ckpt)
    derived = saved_derived(cfg, tasks, overrides or [])
    out_dir = Path(out) if out else default_output(ckpt, "predictions")
    written = [PREDICTIONS, *(f"{path.name}{OVERLAY_SUFFIX}" for path in files)]
    check_output_folder(out_dir, ckpt, written, PREDICTIONS, "checkpoint")
    pp = cfg.data.preprocess
    # No disk cache: the photographs may be anywhere, and each is read once.
    preprocessor = Preprocessor(cfg.data.image_size, pp.fov_crop, pp.clahe, pp.local_mean, None)
    normalise = build_transform([], list(cfg.data.mean), list(cfg.data.std))
    results, unreadable = [], []
    for path in files:
        try:
            prep, origin = prepare(preprocessor, path)
        except ValueError as exc:
            unreadable.append({"image": str(path), "reason": str(exc)})
            continue
        batch = normalise(image=prep.image)["image"][None]
        values = {k: v[0] for k, v in activate(tasks, net(batch)).items()}
        fov = torch.from_numpy(prep.image.max(axis=2) > FOV_THRESHOLD)
        frame = Frame(origin, prep.pixel_scale, fov)
        summaries = {name: task.summarise(values[name], frame) for name, task in tasks.items()}
        lines = [f"{name:<14} {tasks[name].summary_line(s)}" for name, s in summaries.items()]
        measured = measure_image(tasks, derived, values)
        if measured:
            lines.append(
                f"{'derived':<14} " + "  ".join(f"{k}={v:.3f}" for k, v in measured.items())
            )
        overlay = out_dir / f"{path.name}{OVERLAY_SUFFIX}"
        if not results:
            claim_folder(out_dir, ckpt)
        write_overlay(overlay, path.name, prep.image, tasks, values, lines)
        x0, y0 = origin
        side_w, side_h = prep.pixel_scale
        print(f"\n{path}  (FOV box x0={x0:.0f} y0={y0:.0f} side={side_w:.0f}x{side_h:.0f} px)")
        print("\n".join(f"  {line}" for line in lines))
        results.append(
            {
                "image": str(path),
                "fov_box": {"x0": x0, "y0": y0, "width": side_w, "height": side_h},
                "fov_pixels": int(fov.sum()),
                "overlay": str(overlay),
                "tasks": summaries,
                "derived": measured,
            }
        )
    reasons = [entry["reason"] for entry in unreadable]
    if not results:
        raise ValueError(f"no image could be read: {'; '.join(reasons)}")
    payload = {
        "checkpoint": str(ckpt),
        "complete": True,
        "image_size": int(cfg.data.image_size),
        "predictions": results,
        "unreadable": unreadable,
    }
    atomic_write_bytes(out_dir / PREDICTIONS, json.dumps(payload, indent=1).encode())
    print(f"\npredictions for {len(results)} image(s) written to {out_dir / PREDICTIONS}")
    if unreadable:
        print(f"{len(unreadable)} image(s) could not be read and have no predictions:")
        print("\n".join(f"  {reason}" for reason in reasons))
    return payload
