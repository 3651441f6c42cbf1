"""Reading torch files with ``weights_only=True``, and saying what is wrong with one that fails.

torch's errors for a damaged or unsafe file tell the user to retry with ``weights_only=False``,
which runs whatever code the file holds. mtkd never loads a file that way, so it never relays
them: it names the file and says what is wrong with it instead."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from mtkd.config import ConfigError

#: the first bytes of a zip archive, the format torch.save writes since torch 1.6
ZIP_MAGIC = b"PK\x03\x04"


#: what to do with a file that holds pickled objects besides its tensors
RESAVE = "if you trust its source, save its tensors again without the objects"


def load_weights_only(
    path: str | Path,
    what: str,
    resave: str = RESAVE,
    map_location: Any = "cpu",
    mmap: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)``. A file torch cannot read that way is refused
    with a ConfigError that starts with ``what`` (the key or role naming the file); ``resave``
    says what to do when it holds pickled objects. ``mmap``: tensors are mapped, not read, so
    what is read costs milliseconds whatever the file's size."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError:
        raise  # missing or unreadable: the system's own message names the path
    except Exception as exc:  # torch raises many types for one damaged file
        raise ConfigError(f"{what} {why_unreadable(path, exc, resave)}") from None


def why_unreadable(path: str | Path, exc: Exception, resave: str = RESAVE) -> str:
    """What is wrong with a file ``torch.load(weights_only=True)`` failed on, with what to do."""
    # torch wraps the unpickler's own error in one that suggests weights_only=False
    cause = exc.__context__ if isinstance(exc, pickle.UnpicklingError) and exc.__context__ else exc
    unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(cause))
    if unsafe:
        return (
            f"cannot be read safely: besides tensors it holds pickled objects ({unsafe[1]}), and "
            f"unpickling them could run code. mtkd loads only weights-only files (tensors and "
            f"plain values); {resave}"
        )
    try:
        with open(path, "rb") as file:
            head = file.read(len(ZIP_MAGIC))
    except OSError:
        head = None
    if head == b"":
        return "is an empty file; copy it again or point to another file"
    if head == ZIP_MAGIC or isinstance(cause, EOFError):
        reason = str(cause).split(". ")[0].splitlines()[0] if str(cause) else "it ends too early"
        return f"is truncated or damaged ({reason}); copy or save it again"
    return "is not a file torch.save wrote (a .pth, .pt or .ckpt); check the path"
