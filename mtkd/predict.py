"""``mtkd predict ckpt=PATH images=FILE|DIR [out=DIR]``: run a checkpoint on photographs.

Each image goes through the training preprocessing (field-of-view crop, resize, normalisation) so
the network sees what it was trained on. Outputs are turned into readable values: class and
probabilities, regression values, landmark points in the original photograph's pixels (mapped back
through the crop box), and mask areas. Also home of the overlay drawing shared with ``mtkd report``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_modules.io import atomic_write_bytes
from data_modules.preprocess import FOV_THRESHOLD, Prepared, Preprocessor
from data_modules.samples import Sample
from data_modules.transforms import build_transform
from mtkd.modules.checkpoint import load_net
from mtkd.tasks import (
    ClassificationTask,
    LocalizationTask,
    MultilabelTask,
    RegressionTask,
    SegmentationTask,
    Task,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
#: a pixel belongs to a class when its sigmoid probability reaches this
MASK_THRESHOLD = 0.5
#: a point at the original image's origin; its crop coordinates give the crop box offset
_ORIGIN = "__origin__"


def channel_names(task: Task) -> list[str]:
    """Names of a task's outputs: classes, labels or points (indices when the spec has none)."""
    if isinstance(task, ClassificationTask):
        return list(task.spec.class_names or [str(i) for i in range(task.out_channels)])
    if isinstance(task, (MultilabelTask, SegmentationTask)):
        return list(task.spec.classes)
    if isinstance(task, LocalizationTask):
        return list(task.spec.points)
    if isinstance(task, RegressionTask):
        return task.label_names
    return [str(i) for i in range(task.out_channels)]


def activate(tasks: dict[str, Task], outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw network outputs -> each task's readable values (``Task.activate``)."""
    return {n: t.activate(outputs[n]) for n, t in tasks.items()}


def spatial_layers(
    tasks: dict[str, Task], values: dict[str, torch.Tensor], has: dict[str, bool] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    """One sample's masks (class -> bool H x W) and points (name -> normalised (u, v)) from
    activated outputs or from targets; tasks with ``has[name]`` False are left out."""
    masks: dict[str, np.ndarray] = {}
    points: dict[str, tuple[float, float]] = {}
    for name, task in tasks.items():
        if has is not None and not has[name]:
            continue
        if isinstance(task, SegmentationTask):
            for cls, plane in zip(channel_names(task), values[name].cpu().numpy()):
                masks[cls] = plane >= MASK_THRESHOLD
        elif isinstance(task, LocalizationTask):
            for point, (u, v) in zip(channel_names(task), values[name].tolist()):
                points[point] = (u, v)
    return masks, points


def layer_colors(
    tasks: dict[str, Task],
) -> tuple[dict[str, tuple[float, ...]], dict[str, tuple[float, ...]]]:
    """A fixed colour per mask class and per point (two namespaces: a disc mask and a disc
    centre may share a name), so every panel shares one legend."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    masks = [n for t in tasks.values() if isinstance(t, SegmentationTask) for n in channel_names(t)]
    points = [
        n for t in tasks.values() if isinstance(t, LocalizationTask) for n in channel_names(t)
    ]
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


def summarize(
    task: Task,
    value: torch.Tensor,
    origin: tuple[float, float],
    scale: tuple[float, float],
    fov: torch.Tensor,
) -> dict[str, Any]:
    """One task's activated output for one image as JSON-ready, human-readable values."""
    names = channel_names(task)
    if isinstance(task, ClassificationTask):
        probs = value.tolist()
        best = int(np.argmax(probs))
        return {"class": names[best], "index": best, "probabilities": dict(zip(names, probs))}
    if isinstance(task, MultilabelTask):
        return {"probabilities": dict(zip(names, value.tolist()))}
    if isinstance(task, RegressionTask):
        return {"values": dict(zip(names, value.tolist()))}
    if isinstance(task, LocalizationTask):
        (x0, y0), (w, h) = origin, scale
        return {
            "points": {
                n: {"x": x0 + u * w, "y": y0 + v * h} for n, (u, v) in zip(names, value.tolist())
            }
        }
    if isinstance(task, SegmentationTask):
        # Only pixels inside the field of view count: outside it the photograph is black.
        area = ((value >= MASK_THRESHOLD) & fov).flatten(1).sum(dim=1).tolist()
        fov_pixels = max(int(fov.sum()), 1)
        return {
            "area_px": dict(zip(names, area)),
            "fov_fraction": {n: a / fov_pixels for n, a in zip(names, area)},
        }
    return {"output": value.tolist()}


def format_summary(summary: dict[str, Any]) -> str:
    """One table cell line for ``summarize``'s output."""
    if "class" in summary:
        return f"{summary['class']} (p={summary['probabilities'][summary['class']]:.2f})"
    if "probabilities" in summary:
        return "  ".join(f"{k}={v:.2f}" for k, v in summary["probabilities"].items())
    if "values" in summary:
        return "  ".join(f"{k}={v:.3f}" for k, v in summary["values"].items())
    if "points" in summary:
        return "  ".join(
            f"{k}=({p['x']:.0f}, {p['y']:.0f}) px" for k, p in summary["points"].items()
        )
    if "area_px" in summary:
        return "  ".join(
            f"{k}={a} px ({summary['fov_fraction'][k]:.1%} of FOV)"
            for k, a in summary["area_px"].items()
        )
    return str(summary.get("output"))


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


@torch.inference_mode()
def predict(ckpt: str | Path, images: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Predict every image; print a table per image, write predictions.json and overlay PNGs.

    An image that cannot be read does not cost the others their results: it is listed, with the
    reason, under ``unreadable`` in predictions.json and in the printout. Only when no image can
    be read is it an error (so the command exits non-zero)."""
    files = find_images(images)
    net, tasks, cfg = load_net(ckpt)
    out_dir = Path(out) if out else Path(ckpt).resolve().parent.parent / "predictions"
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
        summaries = {
            name: summarize(task, values[name], origin, prep.pixel_scale, fov)
            for name, task in tasks.items()
        }
        lines = [f"{name:<14} {format_summary(s)}" for name, s in summaries.items()]
        overlay = out_dir / f"{path.name}_overlay.png"
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
            }
        )
    reasons = [entry["reason"] for entry in unreadable]
    if not results:
        raise ValueError(f"no image could be read: {'; '.join(reasons)}")
    payload = {
        "checkpoint": str(ckpt),
        "image_size": int(cfg.data.image_size),
        "predictions": results,
        "unreadable": unreadable,
    }
    atomic_write_bytes(out_dir / "predictions.json", json.dumps(payload, indent=1).encode())
    print(f"\npredictions for {len(results)} image(s) written to {out_dir / 'predictions.json'}")
    if unreadable:
        print(f"{len(unreadable)} image(s) could not be read and have no predictions:")
        print("\n".join(f"  {reason}" for reason in reasons))
    return payload


def main(args: list[str]) -> None:
    from mtkd.cli import _take

    ckpt, rest = _take(args, "ckpt")
    images, rest = _take(rest, "images")
    out, rest = _take(rest, "out")
    if rest:
        raise ValueError(f"predict: unknown arguments {rest}; valid: ckpt=, images=, out=")
    if not ckpt or not images:
        raise ValueError("predict needs ckpt=<path/to/best.ckpt> images=<image file or folder>")
    predict(ckpt, images, out)
