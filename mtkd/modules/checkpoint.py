"""Loading mtkd checkpoints safely (``weights_only=True``) with errors that name the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mtkd.config import import_plugins
from mtkd.models.multitask import MultiTaskNet
from mtkd.tasks import Task, build_tasks


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"checkpoint {file} does not exist; train one first (make train-teacher / make distill) "
            "or pass ckpt=<path to .ckpt>"
        )
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"checkpoint {file} cannot be read safely ({exc}); is it an mtkd .ckpt?"
        ) from None
    if "config" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(f"{file} is not an mtkd checkpoint (no saved config)")
    return ckpt


def check_same_tasks(found: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint trained for another task set."""
    norm = lambda specs: {n: build_tasks({n: s})[n].identity() for n, s in specs.items()}  # noqa: E731
    have, want = norm(found), norm(expected)
    if have != want:
        diff = sorted(set(have) ^ set(want)) or sorted(n for n in have if have[n] != want.get(n))
        raise ValueError(
            f"{source} was trained for tasks {sorted(have)} but this run configures {sorted(want)} "
            f"(differing: {diff}). Use a checkpoint trained on the same task set, or set the run's "
            "tasks to match the checkpoint (tasks=<the checkpoint's task group>)."
        )


def load_net(
    path: str | Path, expected_tasks: dict[str, Any] | None = None
) -> tuple[MultiTaskNet, dict[str, Task], Any]:
    """Rebuild the network of a checkpoint (teacher or student) and load its weights."""
    ckpt = read_checkpoint(path)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    import_plugins(list(cfg.get("plugins", [])))
    specs = OmegaConf.to_container(cfg.tasks, resolve=True)
    if expected_tasks is not None:
        check_same_tasks(specs, expected_tasks, f"checkpoint {path}")
    tasks = build_tasks(specs)
    net = MultiTaskNet(tasks, cfg.model)
    prefix = "net."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.eval(), tasks, cfg
