"""Where the commands that read a checkpoint (evaluate, predict, export) write, checked before
any work.

Default outputs go beside the checkpoint's own run: a checkpoint at ``<run>/checkpoints/x.ckpt``
writes into ``<run>/`` (``metrics_test.json``, ``predictions/``, ``export/``); any other ("loose")
checkpoint writes beside itself under its stem (``model_metrics_test.json``,
``model_predictions/``, ``model_export/`` for ``model.ckpt``). They used to go into the
checkpoint's grandparent folder whatever it was, over whatever was there.

A file already in the way is replaced only when mtkd wrote it for this checkpoint: a metrics JSON
whose ``checkpoint`` names it, or a folder whose marker (``predictions.json``, an export's
``metadata.json``) names it. Anything else is refused, naming the file and ``out=``. The same
holds for an ``out=`` the user gives, which must also be a place that can be written.

``check_saved_paths`` keeps a checkpoint from someone else from deciding where evaluate writes:
its saved data paths are read, never generated into.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mtkd.config import ConfigError

#: the folder Lightning's ModelCheckpoint writes into, inside a run directory
CHECKPOINTS = "checkpoints"


def _absolute(path: str | Path) -> Path:
    """The path as the user sees it from here: absolute and normalised, symlinks kept."""
    return Path(os.path.abspath(Path(path).expanduser()))


def default_output(ckpt: str | Path, name: str) -> Path:
    """``<run>/<name>`` for a checkpoint in a run's ``checkpoints/`` folder, else
    ``<folder>/<stem>_<name>`` beside the checkpoint."""
    path = _absolute(ckpt)
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent / name
    return path.parent / f"{path.stem}_{name}"


def names_checkpoint(recorded: Any, ckpt: str | Path) -> bool:
    """Whether a checkpoint path an mtkd output recorded is ``ckpt``: the same path from here,
    or the same last parts (run folder, ``checkpoints/``, file name; for a loose checkpoint its
    folder and file name), so a run that was moved, or evaluated from another working folder,
    still recognises its own files."""
    if not isinstance(recorded, str) or not recorded:
        return False
    path = _absolute(ckpt)
    if _absolute(recorded) == path:
        return True
    depth = 3 if path.parent.name == CHECKPOINTS else 2
    return Path(os.path.normpath(recorded)).parts[-depth:] == path.parts[-depth:]


def _recorded(path: Path, key: str) -> Any:
    """``key`` of the JSON object in ``path``; None when the file is not such a JSON object."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return payload.get(key) if isinstance(payload, dict) else None


def _check_writable(path: Path, what: str) -> None:
    """Refuse a path whose folder cannot be created or written, before any work (the write used
    to fail only after it)."""
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{what}={path} cannot be created: {existing} is a file; choose another {what}="
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{what}={path} cannot be written: no write permission in {existing} (or a read-only "
            f"file system); choose another {what}="
        )


def check_output_file(path: Path, ckpt: str | Path, what: str = "out") -> None:
    """A metrics JSON for ``ckpt`` may be written at ``path``: its folder can be written, and a
    file already there is one mtkd wrote for this checkpoint."""
    if path.is_dir():
        raise ConfigError(f"{what}={path} is a folder; give the path of the JSON file to write")
    _check_writable(path, what)
    if path.exists() and not names_checkpoint(_recorded(path, "checkpoint"), ckpt):
        raise ConfigError(
            f"{path} exists and is not a metrics file mtkd wrote for {ckpt}; it is left as it is: "
            f"give {what}=<another file> (or move it away)"
        )


def check_output_folder(
    folder: Path, ckpt: str | Path, files: list[str], marker: str, key: str, what: str = "out"
) -> None:
    """``files`` (names) may be written into ``folder`` for ``ckpt``: it can be written, and none
    of them is there already unless the folder's ``marker`` JSON names this checkpoint under
    ``key`` (then the folder is mtkd's output for it, written before)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what}={folder} is a file; give a folder to write into")
    _check_writable(folder / marker, what)
    if names_checkpoint(_recorded(folder / marker, key), ckpt):
        return
    taken = [name for name in files if (folder / name).exists()]
    if taken:
        shown = ", ".join(taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
        raise ConfigError(
            f"{folder} holds {shown}, which mtkd did not write for {ckpt} ({folder / marker} does "
            f"not name it); they are left as they are: give {what}=<a new or empty folder>"
        )


def _given(key: str, overrides: list[str]) -> bool:
    """Whether a command-line override sets ``key`` or a section holding it."""
    named = [item.split("=", 1)[0].lstrip("+") for item in overrides if "=" in item]
    return any(key == n or key.startswith(f"{n}.") for n in named)


def _would_create(path: Path) -> bool:
    """Missing, or an empty folder (a generated source fills an empty root)."""
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def check_saved_paths(data_cfg: Any, overrides: list[str], ckpt: str | Path) -> None:
    """Refuse to generate or create what a checkpoint's saved data config names and the command
    line does not: a source root that is missing or empty (a synthetic source would generate a
    data set there), a missing folder among a source's ``*_dir`` options (an adapter writes its
    derived masks there: ``mask_dir``, ``fov_dir``), a missing ``data.preprocess.cache_dir`` and
    a missing ``data.split_file`` (the data module would create them). Existing data, caches and
    split files are only read."""
    found = []
    for name, source in data_cfg.sources.items():
        key = f"data.sources.{name}.root"
        if not _given(key, overrides) and _would_create(Path(str(source.root)).expanduser()):
            found.append((key, source.root, "<the data set's folder>"))
        for option, value in (source.get("options") or {}).items():
            key = f"data.sources.{name}.options.{option}"
            if (
                option.endswith("_dir")
                and value
                and not _given(key, overrides)
                and not Path(str(value)).expanduser().exists()
            ):
                found.append((key, value, "<an existing folder> or null"))
    for key, value, fix in (
        ("data.preprocess.cache_dir", data_cfg.preprocess.cache_dir, "<a folder> or null"),
        ("data.split_file", data_cfg.split_file, "<an existing split file> or null"),
    ):
        if value and not _given(key, overrides) and not Path(value).exists():
            found.append((key, value, fix))
    if found:
        saved = ", ".join(f"{key}={value}" for key, value, _ in found)
        fixes = " ".join(f"{key}={fix}" for key, _, fix in found)
        raise ConfigError(
            f"checkpoint {ckpt} names {saved} in its saved config, which do not exist; "
            f"evaluate creates nothing where only the checkpoint points: give {fixes}"
        )
