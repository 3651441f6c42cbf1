"""Saving and loading mtkd checkpoints safely: atomic writes, ``weights_only=True`` reads, RNG
state for exact resume, and plugins imported only when the user names them."""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from data_modules.io import atomic_write_bytes
from mtkd.config import ConfigError, ModelConfig, import_plugins, to_container
from mtkd.models.multitask import MultiTaskNet
from mtkd.safe_load import load_weights_only
from mtkd.tasks import Task, build_tasks

#: what to do with a checkpoint that holds pickled objects besides its tensors
RESAVE_CHECKPOINT = (
    "use a checkpoint mtkd wrote (they hold nothing else), or, if you trust this one's source, "
    "save it again without the objects"
)


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """An mtkd checkpoint, read weights-only; ``mmap``: its tensors mapped, not read (for its
    saved config alone)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"checkpoint {file} does not exist; train one first (make train-teacher / make distill) "
            "or pass ckpt=<path to .ckpt>"
        )
    ckpt = load_weights_only(file, f"checkpoint {file}", RESAVE_CHECKPOINT, mmap=mmap)
    if not isinstance(ckpt, dict) or "config" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(f"{file} is not an mtkd checkpoint (no saved config)")
    check_plugins(ckpt["hyper_parameters"]["config"].get("plugins", []), file)
    return ckpt


#: environment variable naming the plugin modules a checkpoint may make mtkd import
PLUGINS_ENV = "MTKD_PLUGINS"


def check_plugins(plugins: list[str], source: str | Path) -> None:
    """Refuse a checkpoint whose ``plugins`` would import code the user did not name: a module
    is allowed when this run's own config imported it already, or when ``MTKD_PLUGINS`` lists it."""
    named = {m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()}
    unnamed = [m for m in plugins if m not in sys.modules and m not in named]
    if unnamed:
        raise ConfigError(
            f"checkpoint {source} asks to import plugin modules {unnamed}, which run code. If you "
            f"trust them, name them: {PLUGINS_ENV}={','.join(unnamed)} mtkd ... (or plugins=[...] "
            "in the run's config)"
        )


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


#: model keys that leave the network's tensors as they are: how the encoder starts (a
#: checkpoint's weights replace it), dropout and memory layout
NOT_IN_WEIGHTS = ("encoder_weights", "head_dropout", "channels_last")


def check_same_network(saved: dict[str, Any], cfg: DictConfig, source: str) -> None:
    """Refuse a checkpoint (its saved config ``saved``) of another stage, network or task set
    than ``cfg``'s, naming the keys that differ. Without this, Lightning fails only when it loads
    the weights, with one size-mismatch line per tensor."""
    ours = to_container(cfg.model)
    theirs = {**to_container(OmegaConf.structured(ModelConfig)), **saved.get("model", {})}
    differ = [
        (f"model.{key}", theirs[key], ours[key])
        for key in ours
        if key not in NOT_IN_WEIGHTS and theirs.get(key) != ours[key]
    ]
    if saved.get("stage") != cfg.stage:
        differ.insert(0, ("stage", saved.get("stage"), cfg.stage))
    if differ:
        listed = "; ".join(f"{key} is {there} there, {here} here" for key, there, here in differ)
        raise ConfigError(
            f"{source} was trained as another network than this run's: {listed}. Use a "
            "checkpoint of this stage and network, or set those keys to the checkpoint's values "
            "(a teacher is trained by mtkd train-teacher, a student by mtkd distill)"
        )
    check_same_tasks(saved["tasks"], to_container(cfg.tasks), source)


def _saved_tasks(
    ckpt: dict[str, Any], path: str | Path, expected_tasks: dict[str, Any] | None = None
) -> tuple[dict[str, Task], DictConfig]:
    """The tasks and config a checkpoint was saved with (its plugins imported first)."""
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    import_plugins(list(cfg.get("plugins", [])))  # allowed by read_checkpoint
    specs = OmegaConf.to_container(cfg.tasks, resolve=True)
    if expected_tasks is not None:
        check_same_tasks(specs, expected_tasks, f"checkpoint {path}")
    return build_tasks(specs), cfg


def read_tasks(path: str | Path) -> tuple[dict[str, Task], DictConfig]:
    """A checkpoint's tasks and saved config without its network: the tensors are mapped, never
    read or loaded, so a teacher cache check costs no network build."""
    return _saved_tasks(read_checkpoint(path, mmap=True), path)


def load_net(
    path: str | Path, expected_tasks: dict[str, Any] | None = None
) -> tuple[MultiTaskNet, dict[str, Task], Any]:
    """Rebuild the network of a checkpoint (teacher or student) and load its weights."""
    ckpt = read_checkpoint(path)
    tasks, cfg = _saved_tasks(ckpt, path, expected_tasks)
    net = MultiTaskNet(tasks, without_pretrained(cfg).model)
    prefix = "net."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.eval(), tasks, cfg


def without_pretrained(cfg: Any) -> Any:
    """A checkpoint's config for rebuilding its network: the checkpoint's own weights replace the
    encoder's, so the pretrained ones are not fetched again (``imagenet`` would need the
    internet, ``packaged`` the weights package, to evaluate or export a checkpoint)."""
    return OmegaConf.merge(cfg, {"model": {"encoder_weights": None}})


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through a temporary file in the same folder and a rename (Lightning's
    own writer stages the file under /tmp and moves it, a copy when /tmp is another filesystem,
    so a kill can leave a truncated ``last.ckpt``), and always read by ``load_weights_only``, as
    ``read_checkpoint`` reads them, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(path, buf.getvalue())

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_weights_only(path, f"checkpoint {path}", RESAVE_CHECKPOINT, map_location)


RNG_KEY = "mtkd_rng"


class RngState(Callback):
    """Stores the global RNG states (torch, numpy, Python) in every checkpoint and restores them
    on resume, so a resumed run shuffles and drops out exactly like an uninterrupted one. Only in
    one process: a DDP checkpoint holds rank 0's state, which must not be copied to every rank."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint[RNG_KEY] = {
            "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(RNG_KEY)
        if state is None or trainer.world_size > 1:
            return
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
