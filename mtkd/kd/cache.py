"""Teacher-output cache: DDP-safe writer, memory-mapped reader, fingerprint.

Layout of a cache directory (only ever seen complete: it is assembled under a temporary name
and renamed into place; ``fingerprint.json`` is written last)::

    fingerprint.json   what produced it (per task the teacher files and hashes, tasks,
                       preprocessing, split, each training image's content digest, storage)
    checksums.json     sha256, size and (arrays) .npy header of every other file
    index.json         sample ids; position = row in every array
    <task>.npy         one array per task, rows [N, (views,) ...], read with mmap
    features_<i>.npy   teacher i's image embedding [N, D_i] float16 (only with kd.features.weight
                       > 0: feature-level KD; see ``MultiTaskNet.forward_with_features``)
    feature_map_<i>.npy  teacher i's encoder feature map at kd.features.map_stride [N, C_i, h, w]
                       float16, h = w = data.image_size / stride (only with
                       kd.features.map_weight > 0: dense feature-level KD)
    view_seeds.npy     [N, views] augmentation seeds of the cached views (exact multi-view mode)

Rows are keyed by sample_id, never by dataset or batch index, so sampler padding and worker
order cannot misplace an output.

Checks that scale: every file is hashed once, when ``cache-teacher`` writes it (rank 0, before the
folder is renamed into place). Opening a cache (``cache.verify=quick``) checks only what costs
milliseconds whatever its size: each file present, of its recorded size, and each array's .npy
header (shape, dtype, order) as recorded. Bytes overwritten in place at the same size are found
only by hashing everything again: ``cache.verify=full`` or ``mtkd cache-check``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import albumentations
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import OmegaConf

from data_modules.io import atomic_save_npy, atomic_write_bytes
from data_modules.preprocess import preprocess_steps, source_sizes
from data_modules.transforms import view_seed
from mtkd.kd.fidelity import MapFidelity
from mtkd.kd.storage import CacheStorage
from mtkd.tasks import Task

#: 2: teacher files recorded and compared always; checksums.json. 3: teachers per task.
#: 4: each training image's content digest (``images``). 5: a replayed view's transforms share
#: one generator (``Augmentation.set_random_seed``), so views of older caches replay differently.
#: 6: checksums.json records each array's .npy header, which every open checks instead of hashing
FORMAT_VERSION = 6
FINGERPRINT = "fingerprint.json"
CHECKSUMS = "checksums.json"
INDEX = "index.json"
SEEDS = "view_seeds.npy"
#: teacher embeddings are stored in half precision: 2 bytes per dimension and sample
FEATURE_DTYPE = "float16"
#: storage parts that say how cached views were drawn (cache.views > 0) -> what they name
REPLAYED = {"augment": "data.augment", "albumentations": "albumentations version"}


class StaleCacheError(RuntimeError):
    """The cache does not describe the current teacher / tasks / data."""


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (memory stays flat whatever its size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def feature_name(teacher: int) -> str:
    """The name of teacher ``teacher``'s (its index in the ensemble) embeddings: their shard key,
    their array (``<name>.npy``) and their line in ``nbytes_per_sample``."""
    return f"features_{teacher}"


def feature_map_name(teacher: int) -> str:
    """The name of teacher ``teacher``'s feature maps, as ``feature_name`` is of its embeddings;
    also their key in a batch's ``teacher`` outputs."""
    return f"feature_map_{teacher}"


def feature_arrays(features: dict[str, Any]) -> dict[str, list[int]]:
    """The teacher feature arrays a cache's fingerprint ``features`` part records: name -> the
    shape of one sample's row (embeddings, then feature maps; each teacher in order)."""
    shapes = {feature_name(i): [int(d)] for i, d in enumerate(features.get("dims") or [])}
    for i, shape in enumerate(features.get("map_shapes") or []):
        shapes[feature_map_name(i)] = list(shape)
    return shapes


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(
    task_teachers: dict[str, list[dict[str, str]]],
    tasks: dict[str, Task],
    data_cfg: Any,
    train_ids: Mapping[str, str],
    storage: CacheStorage,
    views: int,
    features: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a cached output depends on, compared part by part by ``check_fingerprint``.
    ``task_teachers`` names, for each of the run's ``tasks``, the teacher files that produce it
    ([{path, sha256, task}], empty when no teacher covers it): a changed teacher invalidates the
    tasks it taught, and the paths let a later ``distill`` re-hash the files and notice a
    retrained teacher even when the run names none. ``train_ids``: the training samples, each
    with its image's content digest (``FundusDataModule.train_digests``), recorded per sample
    so an image replaced in place after caching is named. ``features``: the cached teacher
    embeddings and feature maps, {dims, map_stride, map_shapes, dtype, teachers (file hashes)}
    in teacher order (``dims`` only with embeddings, ``map_*`` only with maps); None: none cached
    (left out, so a cache without them is written as before). The sources preprocessed at a
    size of their own are recorded only when there are some, for the same reason."""
    storage = {**dataclasses.asdict(storage), "views": views}
    sizes = source_sizes(data_cfg)
    if views:
        # Replayed views depend on the augmentation and the library that samples it.
        storage["augment"] = _digest(OmegaConf.to_container(data_cfg.augment, resolve=True))
        storage["albumentations"] = albumentations.__version__
    files = {f["path"]: f["sha256"] for taught in task_teachers.values() for f in taught}
    found = {
        "format_version": FORMAT_VERSION,
        "teachers": sorted(set(files.values())),
        "teacher_files": dict(sorted(files.items())),
        "task_teachers": dict(sorted(task_teachers.items())),
        "tasks": {name: task.identity() for name, task in sorted(tasks.items())},
        "preprocessing": {
            "image_size": int(data_cfg.image_size),
            **preprocess_steps(data_cfg.preprocess),
            "mean": [float(v) for v in data_cfg.mean],
            "std": [float(v) for v in data_cfg.std],
            **({"source_sizes": sizes} if sizes else {}),
        },
        "split": {"train_samples": len(train_ids), "digest": _digest(sorted(train_ids))},
        "storage": storage,
        "images": dict(sorted(train_ids.items())),
    }
    if features is not None:
        found["features"] = features
    return found


def teaches_source(sources: list[str] | None, source: str) -> bool:
    """Whether a teacher limited to ``sources`` (None: every source) teaches ``source``'s
    images."""
    return sources is None or source in sources


def source_reach(
    task_sources: Mapping[str, list[list[str] | None]], feature_sources: list[Any] | None = None
) -> dict[str, list[list[str] | None]]:
    """For each task (and teacher embedding, by ``feature_name``) that a teacher limited to some
    data sources teaches (``kd.teachers[i].sources``), the sources each of its teachers teaches
    (None: all). ``task_sources``: per task, its teachers' sources. Tasks whose teachers teach
    every source are left out: they are taught on every image."""
    reach = {
        name: list(sources)
        for name, sources in task_sources.items()
        if any(s is not None for s in sources)
    }
    for i, sources in enumerate(feature_sources or []):
        if sources is not None:
            reach[feature_name(i)] = [sources]
    return reach


def recorded_reach(
    found: dict[str, Any], tasks: Iterable[str]
) -> dict[str, list[list[str] | None]]:
    """``source_reach`` of a cache's fingerprint, for those of ``tasks`` it holds."""
    taught = found.get("task_teachers", {})
    return source_reach(
        {n: [f.get("sources") for f in taught[n]] for n in tasks if taught.get(n)},
        found.get("features", {}).get("sources"),
    )


def taught_masks(
    reach: Mapping[str, list[list[str] | None]], sources: list[str]
) -> dict[str, torch.Tensor]:
    """Per entry of ``source_reach``: which samples of a batch (by their data source) some of its
    teachers teach; the others learn that task on labels only."""
    return {
        name: torch.tensor([any(teaches_source(r, s) for r in teachers) for s in sources])
        for name, teachers in reach.items()
    }


def stored_storage(found: dict[str, Any]) -> CacheStorage:
    """The storage a cache's fingerprint records (caches written before per-task dense sizes
    have one size for every task)."""
    stored = found["storage"]
    fields = {f.name: stored[f.name] for f in dataclasses.fields(CacheStorage) if f.name in stored}
    return CacheStorage(**fields)


def _taught_by(files: list[dict[str, Any]]) -> list[tuple[str, str, tuple[str, ...]]]:
    """What identifies a task's teachers: file contents, the teacher's task and the data sources
    it teaches, not the path."""
    return sorted((f["sha256"], f["task"], tuple(f.get("sources") or ())) for f in files)


def sources_note(file: dict[str, Any]) -> str:
    """`` [on a, b images only]`` for a teacher entry limited to some data sources, else ""."""
    return f" [on {', '.join(file['sources'])} images only]" if file.get("sources") else ""


def _teacher_line(file: dict[str, Any]) -> str:
    return f"{file['path']} ({file['sha256'][:12]}){sources_note(file)}"


def _changed_images(found: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """What the cache says of the training images whose content differs from this run's (None:
    none differs, or the run brings no digests); ids in one split only are the split's part."""
    if "images" not in expected:
        return None
    if "images" not in found:
        return (
            "it records no image contents (written by an older mtkd), so images replaced since "
            "cannot be found"
        )
    have, want = found["images"], expected["images"]
    changed = sorted(sid for sid, digest in want.items() if have.get(sid, digest) != digest)
    if not changed:
        return None
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return (
        f"{len(changed)} of {len(want)} training images changed since it was built ({shown}): "
        "the teacher outputs it holds are of the old pixels"
    )


def check_fingerprint(found: dict[str, Any], expected: dict[str, Any], cache_dir: str) -> None:
    """Raise StaleCacheError naming each differing part (for teachers, the tasks whose teachers
    changed; for images, how many and which changed) and the command that rebuilds."""
    parts = ["format_version", "tasks", "preprocessing", "split"]
    differing = [p for p in parts if found.get(p) != expected.get(p)]
    images = _changed_images(found, expected)
    have, want = found.get("task_teachers", {}), expected["task_teachers"]
    retaught = sorted(
        n
        for n in set(have) | set(want)
        if _taught_by(have.get(n, [])) != _taught_by(want.get(n, []))
    )
    replayed = {k: found.get("storage", {}).get(k) for k in REPLAYED}
    redrawn = sorted(k for k, v in replayed.items() if v != expected["storage"].get(k))
    if not differing and not retaught and not redrawn and images is None:
        return
    lines = [f"teacher cache {cache_dir} does not match this run:"]
    if images is not None:
        lines.append(f"  - {images}")
    if redrawn:
        lines.append(
            f"  - its {found['storage']['views']} cached views were drawn with another "
            f"{' and '.join(REPLAYED[k] for k in redrawn)}, so the views replayed now are not "
            "the ones the teacher saw"
        )
    for part in differing:
        lines.append(
            f"  - {part} differs: cache has {found.get(part)!r}, this run has {expected.get(part)!r}"
        )
    if retaught:
        shown = lambda taught, n: [_teacher_line(f) for f in taught.get(n, [])]  # noqa: E731
        lines.append(f"  - teachers differs for tasks {retaught}:")
        lines += [
            f"      {n}: cache has {shown(have, n) or 'no teacher'}, this run has "
            f"{shown(want, n) or 'no teacher'}"
            for n in retaught
        ]
    lines.append(
        f"Rebuild it with the same data/task/kd.teachers settings as this run: "
        f"{rebuild_command(cache_dir)} (or make cache-teacher)"
    )
    raise StaleCacheError("\n".join(lines))


def rebuild_command(cache_dir: str | Path, teachers: list[str] | None = None) -> str:
    named = " ".join(f"teacher={t}" for t in teachers or ["<teacher.ckpt>"])
    return f"mtkd cache-teacher {named} kd.cache_dir={cache_dir}"


def recorded_teachers(found: dict[str, Any], cache_dir: str) -> dict[str, list[dict[str, str]]]:
    """The teachers a cache records per task, with each file hashed again now (a retrained
    teacher makes the tasks it taught stale); for a run that names no teacher."""
    gone = [p for p in found.get("teacher_files", {}) if not Path(p).is_file()]
    if gone:
        raise StaleCacheError(
            f"teacher cache {cache_dir} was built from {gone}, which no longer exist(s), so it "
            "cannot be checked against its teacher. Name the teacher with kd.teacher=<ckpt> (or "
            f"kd.teachers), or rebuild: {rebuild_command(cache_dir)}"
        )
    now = {sha: (p, file_sha256(p)) for p, sha in found.get("teacher_files", {}).items()}
    return {
        task: [{**f, "path": now[f["sha256"]][0], "sha256": now[f["sha256"]][1]} for f in files]
        for task, files in found.get("task_teachers", {}).items()
    }


def read_fingerprint(cache_dir: str | Path) -> dict[str, Any]:
    """The fingerprint of a complete cache; a folder without one is absent or incomplete (it is
    written last)."""
    cache_dir = Path(cache_dir)
    meta = cache_dir / FINGERPRINT
    if not meta.exists():
        hint = (
            "it is incomplete (a crashed or running cache-teacher?)"
            if cache_dir.exists()
            else "it does not exist"
        )
        raise FileNotFoundError(
            f"teacher cache {cache_dir}: {hint}. Build it with "
            f"`mtkd cache-teacher teacher=<teacher.ckpt> kd.cache_dir={cache_dir}`."
        )
    return json.loads(meta.read_text())


def npy_header(path: str | Path) -> dict[str, Any] | None:
    """An .npy file's shape, order and dtype, read from its header alone (a few hundred bytes
    whatever the array's size); None when it has no readable header."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read(fh)
        except ValueError:
            return None
    return {"shape": list(shape), "fortran_order": fortran_order, "dtype": dtype.str}


def file_record(path: Path) -> dict[str, Any]:
    """What checksums.json records of one cache file: its sha256 and size, and an array's .npy
    header, so that an open can check the layout without reading the data."""
    record: dict[str, Any] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    if path.suffix == ".npy":
        record["header"] = npy_header(path)
    return record


def seal(folder: Path, ids: list[str], fingerprint_data: dict[str, Any]) -> None:
    """Complete a folder that holds a cache's arrays: ``index.json``, then ``checksums.json``
    (every file hashed: the one full read of the cache), then ``fingerprint.json``, last, since
    a folder without it reads as incomplete."""
    atomic_write_bytes(folder / INDEX, json.dumps(ids).encode())
    sums = {p.name: file_record(p) for p in sorted(folder.iterdir())}
    atomic_write_bytes(folder / CHECKSUMS, json.dumps(sums, indent=1).encode())
    atomic_write_bytes(folder / FINGERPRINT, json.dumps(fingerprint_data, indent=1).encode())


def _file_problem(file: Path, want: dict[str, Any], full: bool) -> str | None:
    """What is wrong with one cache file against its checksums.json record (None: nothing).
    Without ``full`` a same-size overwrite of the data goes unseen: only hashing finds it."""
    if not file.is_file():
        return "is missing"
    size = file.stat().st_size
    if size != want["bytes"]:
        return f"has {size} bytes, {want['bytes']} were written (truncated or overwritten)"
    if file.suffix == ".npy" and (header := npy_header(file)) != want["header"]:
        found = "no readable .npy header" if header is None else f"the .npy header {header}"
        return f"has {found}, {want['header']} was written (overwritten)"
    if full and file_sha256(file) != want["sha256"]:
        return "does not match its checksum (damaged)"
    return None


def checked_files(
    cache_dir: str | Path, found: dict[str, Any], full: bool = False
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each file checksums.json lists, with its record, once it passed ``_file_problem``; the
    first that fails raises StaleCacheError naming it and the rebuild command. A cache of
    another format (``found``: its fingerprint) is refused before its files are read."""
    cache_dir = Path(cache_dir)
    teachers = list(found.get("teacher_files", {}))
    fix = f"Rebuild it: {rebuild_command(cache_dir, teachers or None)}"
    version = found.get("format_version")
    if version != FORMAT_VERSION:
        raise StaleCacheError(
            f"teacher cache {cache_dir} is of format {version}, written by another mtkd (this one "
            f"reads format {FORMAT_VERSION}). {fix}"
        )
    sums = cache_dir / CHECKSUMS
    if not sums.is_file():
        raise StaleCacheError(f"teacher cache {cache_dir}: {CHECKSUMS} is missing. {fix}")
    for name, want in json.loads(sums.read_text()).items():
        problem = _file_problem(cache_dir / name, want, full)
        if problem is not None:
            raise StaleCacheError(f"teacher cache {cache_dir}: {name} {problem}. {fix}")
        yield name, want


class TeacherCache:
    """Read-only view of a complete cache; arrays are memory-mapped lazily in each process
    (DataLoader workers included), so memory does not grow with the cache size."""

    def __init__(
        self,
        cache_dir: str | Path,
        tasks: dict[str, Task],
        full: bool = False,
        found: dict[str, Any] | None = None,
        maps: bool = False,
    ) -> None:
        """Open ``cache_dir`` after ``checked_files`` passed: ``full`` also hashes every file
        (``cache.verify=full``), otherwise sizes and .npy headers only (milliseconds).
        ``found``: its fingerprint when the caller has read it already (it holds a digest per
        image, so it is not parsed twice). ``maps``: ``get`` also returns the teacher feature
        maps it holds (dense feature KD), which then ride the augmentation with the image."""
        self.dir = Path(cache_dir)
        self.fingerprint = read_fingerprint(self.dir) if found is None else found
        taught = self.fingerprint.get("task_teachers", {})
        #: the tasks some teacher covers (the others have no array and train on labels only)
        self.tasks = {n: t for n, t in tasks.items() if taught.get(n)}
        self.views = int(self.fingerprint["storage"]["views"])
        features = self.fingerprint.get("features", {})
        #: each teacher's embedding length, None when the cache holds no embeddings
        self.feature_dims: list[int] | None = features.get("dims")
        #: each teacher's feature map shape [C, h, w] and their stride, None when it holds none
        self.map_shapes: list[list[int]] | None = features.get("map_shapes")
        self.map_stride: int | None = features.get("map_stride")
        #: each teacher's feature map channels, None when it holds no maps
        self.map_channels = [s[0] for s in self.map_shapes] if self.map_shapes else None
        self._shapes = feature_arrays(features)
        #: the feature maps ``get`` adds to a sample's teacher outputs -> how they follow the
        #: image (``data_modules.pack.CARRIERS``); empty unless ``maps``
        self.carried = {
            feature_map_name(i): "grid" for i in range(len(self.map_shapes or []) if maps else 0)
        }
        for _ in checked_files(self.dir, self.fingerprint, full):
            pass
        ids = json.loads((self.dir / INDEX).read_text())
        self.rows = {sid: i for i, sid in enumerate(ids)}
        self._arrays: dict[str, np.ndarray] | None = None
        self._seeds: np.ndarray | None = None
        self._features: dict[str, np.ndarray] = {}
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_arrays=None, _seeds=None, _features={}, _pid=-1)
        return state

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = {n: np.load(self.dir / f"{n}.npy", mmap_mode="r") for n in self.tasks}
            if self.views:
                self._seeds = np.load(self.dir / SEEDS, mmap_mode="r")
            self._features = {
                n: np.load(self.dir / f"{n}.npy", mmap_mode="r") for n in self._shapes
            }
            self._pid = os.getpid()
        return self._arrays

    def row(self, sample_id: str) -> int:
        try:
            return self.rows[sample_id]
        except KeyError:
            raise KeyError(
                f"sample {sample_id!r} is not in teacher cache {self.dir}; the training set changed "
                "since it was built. Rebuild with `mtkd cache-teacher`."
            ) from None

    def get(self, sample_id: str, view: int = 0) -> dict[str, np.ndarray]:
        arrays, row = self._open(), self.row(sample_id)
        found = {
            n: self.tasks[n].decode_cache(arrays[n][row, view] if self.views else arrays[n][row])
            for n in self.tasks
        }
        found.update({n: self._features[n][row].astype(np.float32) for n in self.carried})
        return found

    def features(self, sample_ids: list[str]) -> list[np.ndarray]:
        """Each teacher's embeddings of ``sample_ids`` (B x D_i float32), in teacher order."""
        self._open()
        rows = [self.row(sid) for sid in sample_ids]
        return [
            np.asarray(self._features[feature_name(i)][rows], dtype=np.float32)
            for i in range(len(self.feature_dims or []))
        ]

    def view_seed(self, sample_id: str, view: int) -> int:
        self._open()
        return int(self._seeds[self.row(sample_id), view])

    def nbytes_per_sample(self) -> dict[str, int]:
        arrays = self._open()
        sizes = {n: int(a[0].nbytes) for n, a in arrays.items()}
        sizes.update({n: int(a[0].nbytes) for n, a in self._features.items()})
        return sizes


def check_replaceable(cache_dir: str | Path) -> None:
    """Refuse to replace ``cache_dir`` unless it is absent, empty, or a teacher cache that holds
    only what cache-teacher wrote (its fingerprint, its checksums and the files they list): a
    run, a data set or any other folder named by mistake must never be swapped away."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir() or not any(cache_dir.iterdir()):
        return
    fix = f"choose a new or empty folder (e.g. kd.cache_dir={cache_dir / 'teacher_cache'})"
    try:
        marker = json.loads((cache_dir / FINGERPRINT).read_text())
        listed = set(json.loads((cache_dir / CHECKSUMS).read_text()))
    except (OSError, ValueError, TypeError):
        marker, listed = None, set()
    if not isinstance(marker, dict) or "format_version" not in marker:
        raise ValueError(
            f"kd.cache_dir={cache_dir} is a folder that is not a teacher cache (no mtkd "
            f"{FINGERPRINT} and {CHECKSUMS}); cache-teacher would replace it: {fix}"
        )
    foreign = sorted(
        p.name for p in cache_dir.iterdir() if p.name not in listed | {FINGERPRINT, CHECKSUMS}
    )
    if foreign:
        raise ValueError(
            f"kd.cache_dir={cache_dir} is a teacher cache that also holds files cache-teacher did "
            f"not write ({', '.join(foreign[:5])}); move them out, or {fix}"
        )


def remove_orphans(cache_dir: str | Path) -> list[Path]:
    """Delete the shard (``.partial-*``), merge (``.tmp-*``) and swap (``.old-*``) folders that
    interrupted writers left beside ``cache_dir``. Call it holding the cache's lock
    (``mtkd.locks``): every such folder's writer is then gone."""
    cache_dir = Path(cache_dir)
    found = [
        p
        for kind in ("partial", "tmp", "old")
        for p in cache_dir.parent.glob(f".{cache_dir.name}.{kind}-*")
        if p.is_dir()
    ]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def run_token() -> str:
    """An id shared by all ranks of one launch (set before Lightning spawns the other ranks)."""
    for key in ("MTKD_RUN_TOKEN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(key):
            return os.environ[key]
    os.environ["MTKD_RUN_TOKEN"] = uuid.uuid4().hex[:12]
    return os.environ["MTKD_RUN_TOKEN"]


class CacheShardWriter(BasePredictionWriter):
    """Each rank writes every predicted batch as its own shard file (temp name, then rename).
    ``merge_shards`` on rank 0 then assembles the cache. ``features``: also write each teacher's
    embeddings (``TeacherEnsemble.predict_with_features``); its feature maps are written when the
    predictions hold them (``TeacherEnsemble.map_stride``)."""

    def __init__(
        self,
        shard_dir: str | Path,
        tasks: dict[str, Task],
        storage: CacheStorage,
        features: bool = False,
    ):
        super().__init__(write_interval="batch")
        self.shard_dir = Path(shard_dir)
        self.tasks = tasks
        self.storage = storage
        self.features = features
        self.fidelity = MapFidelity()

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Start from an empty shard folder: one left by a crashed run under the same run token
        # (torchrun's default TORCHELASTIC_RUN_ID is "none") must not be merged into this cache.
        if trainer.is_global_zero:
            shutil.rmtree(self.shard_dir, ignore_errors=True)
        trainer.strategy.barrier("mtkd-cache-shards")

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        arrays = {}
        for n, out in prediction["outputs"].items():
            arrays[f"task_{n}"] = self.tasks[n].encode_cache(out, self.storage.for_task(n))
            self.fidelity.update(n, self.tasks[n], out, arrays[f"task_{n}"])
        named = {feature_map_name(i): m for i, m in enumerate(prediction["maps"])}
        if self.features:
            named.update({feature_name(i): f for i, f in enumerate(prediction["features"])})
        for name, values in named.items():
            stored = values.float().cpu().numpy().astype(FEATURE_DTYPE)
            if not np.isfinite(stored).all():
                raise ValueError(
                    f"the teacher features {name} do not fit {FEATURE_DTYPE} (values beyond "
                    "65504); feature-level KD cannot cache this teacher"
                )
            arrays[name] = stored
        ids = np.asarray(prediction["sample_id"])
        name = f"rank{trainer.global_rank}-view{dataloader_idx}-batch{batch_idx}.npz"
        buf = io.BytesIO()
        np.savez(buf, sample_id=ids, view=np.asarray(dataloader_idx), **arrays)
        atomic_write_bytes(self.shard_dir / name, buf.getvalue())

    def on_predict_end(self, trainer, pl_module) -> None:
        self.fidelity.report(self.tasks)


def merge_shards(
    shard_dir: str | Path,
    cache_dir: str | Path,
    tasks: dict[str, Task],
    fingerprint_data: dict[str, Any],
    expected_ids: list[str],
) -> Path:
    """Assemble shards into a complete cache at ``cache_dir`` (atomic directory swap).

    Each sample id is written once whatever the sampler padded; a sample missing from the shards
    is an error, so an incomplete prediction never yields a cache that looks complete. With
    views, each view's augmentation seed (``view_seed``, what the predicting data module drew
    with) is stored beside them, so a later run replays the recorded seeds.
    """
    shard_dir, cache_dir = Path(shard_dir), Path(cache_dir)
    check_replaceable(cache_dir)
    views = int(fingerprint_data["storage"]["views"])
    storage = stored_storage(fingerprint_data)
    ids = sorted(set(expected_ids))
    rows = {sid: i for i, sid in enumerate(ids)}
    tmp = cache_dir.parent / f".{cache_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        arrays = {
            n: np.lib.format.open_memmap(
                tmp / f"{n}.npy",
                mode="w+",
                dtype=t.cache_dtype(storage.for_task(n)),
                shape=(len(ids), *([views] if views else []), *t.cache_shape(storage.for_task(n))),
            )
            for n, t in tasks.items()
        }
        embeddings = {
            name: np.lib.format.open_memmap(
                tmp / f"{name}.npy", mode="w+", dtype=FEATURE_DTYPE, shape=(len(ids), *shape)
            )
            for name, shape in feature_arrays(fingerprint_data.get("features", {})).items()
        }
        seen = np.zeros((len(ids), max(views, 1)), dtype=bool)
        for shard in sorted(shard_dir.glob("*.npz")):
            with np.load(shard) as data:
                view = int(data["view"])
                for j, sid in enumerate(data["sample_id"]):
                    row = rows.get(str(sid))
                    if row is None:
                        continue
                    for n in tasks:
                        target = arrays[n][row, view] if views else arrays[n][row]
                        target[...] = data[f"task_{n}"][j]
                    for name, embedding in embeddings.items():
                        embedding[row] = data[name][j]
                    seen[row, view] = True
        missing = [ids[i] for i in np.flatnonzero(~seen.all(axis=1))]
        if missing:
            raise RuntimeError(
                f"teacher predictions are missing for {len(missing)} samples (e.g. {missing[:3]}); "
                "the cache was not written. Rerun cache-teacher."
            )
        for array in [*arrays.values(), *embeddings.values()]:
            array.flush()
        del arrays, embeddings
        if views:
            seeds = np.array(
                [[view_seed(sid, k) for k in range(views)] for sid in ids], dtype=np.int64
            )
            atomic_save_npy(tmp / SEEDS, seeds)
        seal(tmp, ids, fingerprint_data)
        old = None
        if cache_dir.exists():
            old = cache_dir.parent / f".{cache_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(cache_dir, old)
        os.replace(tmp, cache_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(shard_dir, ignore_errors=True)
    return cache_dir
