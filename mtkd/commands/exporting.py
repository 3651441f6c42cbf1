"""``mtkd export ckpt=PATH [out=DIR]``: the deployable student, without Lightning or the teacher.

Writes ``model.pt`` (the network's state dict only: no optimiser state, no teacher, no config
pickles; loads with ``weights_only=True``), ``model.onnx`` (one named output per task, dynamic
batch axis) and ``metadata.json`` (everything needed to rebuild the network and to preprocess and
read its outputs, and the derived measures: ``derived``). Every file is written atomically.

The derived measures (``mtkd.derived``) are listed in the metadata, each with its inputs, options
and formula, not computed in the ONNX graph: connected components (lesion counts) have no ONNX
operator, and a deployment reads the thresholded masks and points the graph already outputs.
"""

from __future__ import annotations

import io
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from data_modules.io import atomic_write_bytes
from data_modules.preprocess import FOV_THRESHOLD, preprocess_steps
from mtkd.derived import DerivedMeasure, saved_derived
from mtkd.models.multitask import MultiTaskNet, count_parameters
from mtkd.modules.checkpoint import load_net
from mtkd.outputs import check_output_folder, default_output
from mtkd.status import status_logger
from mtkd.tasks import Task

log = status_logger(__name__)

ONNX_OPSET = 17
INPUT_NAME = "image"
#: names the source checkpoint, so it marks an export folder as mtkd's
METADATA = "metadata.json"
#: every file an export writes
FILES = ("model.pt", "model.onnx", METADATA)


class TaskOutputs(nn.Module):
    """The network with its outputs as a tuple in task order, so ONNX output ``i`` is task ``i``
    (the network's dict puts dense tasks first)."""

    def __init__(self, net: MultiTaskNet, tasks: dict[str, Task]) -> None:
        super().__init__()
        self.net = net
        self.tasks = tasks

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.net(image)
        return tuple(t.exported(outputs[n]) for n, t in self.tasks.items())


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def onnx_bytes(net: MultiTaskNet, tasks: dict[str, Task], image_size: int) -> bytes:
    """ONNX (TorchScript exporter, opset 17) with named per-task outputs and a dynamic batch."""
    buf = io.BytesIO()
    example = torch.randn(2, 3, image_size, image_size)
    batch_axis = {0: "batch"}
    torch.onnx.export(
        TaskOutputs(net, tasks).eval(),
        (example,),
        buf,
        input_names=[INPUT_NAME],
        output_names=list(tasks),
        dynamic_axes={INPUT_NAME: batch_axis, **{n: batch_axis for n in tasks}},
        opset_version=ONNX_OPSET,
        dynamo=False,
    )
    return buf.getvalue()


def metadata(
    ckpt: str | Path,
    net: MultiTaskNet,
    tasks: dict,
    cfg: Any,
    derived: dict[str, DerivedMeasure] | None = None,
) -> dict[str, Any]:
    """What a consumer needs besides the weights: input size and normalisation, preprocessing,
    each output's shape and channel names, the config to rebuild the network, and how to compute
    each derived measure from the outputs (a sigmoid output's mask: probability >= 0.5)."""
    size = int(cfg.data.image_size)
    with torch.inference_mode():
        raw = net(torch.zeros(1, 3, size, size))
        shapes = {n: list(t.exported(raw[n]).shape[1:]) for n, t in tasks.items()}
    return {
        "format": "mtkd-export/1",
        "source_checkpoint": str(ckpt),
        "stage": cfg.stage,
        "parameters": count_parameters(net),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, size, size],
            "image_size": size,
            "layout": "RGB, float32, (pixel / 255 - mean) / std",
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
            "preprocess": {**preprocess_steps(cfg.data.preprocess), "fov_threshold": FOV_THRESHOLD},
        },
        "outputs": list(tasks),
        "tasks": {
            name: {
                "kind": task.kind,
                "spec": task.describe(),
                "names": task.channel_names(),
                "activation": task.activation,
                "shape": ["batch", *shapes[name]],
            }
            for name, task in tasks.items()
        },
        "derived": {name: entry.describe() for name, entry in (derived or {}).items()},
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "versions": {
            "mtkd": package_version("mtkd"),
            "torch": torch.__version__,
            "onnx_opset": ONNX_OPSET,
        },
    }


def export(
    ckpt: str | Path, out: str | Path | None = None, overrides: list[str] | None = None
) -> Path:
    """Write model.pt, model.onnx and metadata.json for a checkpoint's network; returns the folder.
    ``overrides``: ``derived.<name>={...}`` measures added to the checkpoint's own.

    Default folder: ``export/`` beside the checkpoint's run (``mtkd.outputs``); files already there
    are replaced only when its metadata.json names this checkpoint, checked before the export."""
    net, tasks, cfg = load_net(ckpt)
    derived = saved_derived(cfg, tasks, overrides or [])
    out_dir = Path(out) if out else default_output(ckpt, "export")
    check_output_folder(out_dir, ckpt, list(FILES), METADATA, "source_checkpoint")
    if cfg.stage == "teacher":
        log.warning(f"note: {ckpt} is a teacher checkpoint; exporting the teacher, not a student")
    names = list(tasks)
    weights = io.BytesIO()
    torch.save(net.state_dict(), weights)
    atomic_write_bytes(out_dir / "model.pt", weights.getvalue())
    atomic_write_bytes(out_dir / "model.onnx", onnx_bytes(net, tasks, int(cfg.data.image_size)))
    meta = metadata(ckpt, net, tasks, cfg, derived)
    atomic_write_bytes(out_dir / METADATA, json.dumps(meta, indent=1).encode())
    log.info(
        f"exported {cfg.stage} network ({meta['parameters']:,} parameters, tasks {names}) to "
        f"{out_dir}: model.pt, model.onnx, metadata.json"
    )
    return out_dir
