"""Cache checks that scale (issue 18, 4): a cache is hashed once, when it is written; opening it
(``cache.verify=quick``) checks sizes, .npy headers and the teachers' file hashes without reading
the arrays or building a teacher network; ``cache.verify=full`` and ``mtkd cache-check`` hash every
file. Small caches are written with the module's own writer (``merge_shards``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mtkd.kd.cache as cache_module
import mtkd.kd.ensemble as ensemble_module
from mtkd import cli
from mtkd.config import ConfigError, to_container
from mtkd.kd.cache import (
    CHECKSUMS,
    FINGERPRINT,
    StaleCacheError,
    TeacherCache,
    file_record,
    fingerprint,
    merge_shards,
)
from mtkd.kd.ensemble import TeacherEntry, teacher_provenance
from mtkd.kd.storage import cache_storage
from mtkd.run_config import load_config
from mtkd.stages import open_checked_cache
from mtkd.tasks import build_tasks
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.unit

#: training samples of the fake cache, each with its image's (made-up) content digest
TRAIN = {f"s{i}": f"{i:032x}" for i in range(6)}


def _teacher(tmp_path: Path) -> Path:
    """A teacher checkpoint that holds only its saved config: opening a cache must never need
    its weights."""
    cfg = load_config("teacher", tiny_overrides(tmp_path / "data", tmp_path / "teacher"))
    path = tmp_path / "teacher.ckpt"
    torch.save({"hyper_parameters": {"config": to_container(cfg)}, "state_dict": {}}, path)
    return path


def _cfg(tmp_path: Path, *extra: str):
    return load_config("distill", [*tiny_overrides(tmp_path / "data", tmp_path), *extra])


def _write_cache(cfg, teacher: Path) -> tuple[Path, dict]:
    """A cache of ``TRAIN`` taught by ``teacher``, merged from one shard of random outputs."""
    tasks = build_tasks(to_container(cfg)["tasks"])
    storage = cache_storage(cfg)
    taught, _ = teacher_provenance(
        [TeacherEntry(str(teacher))], to_container(cfg)["tasks"], cfg.data, list(tasks)
    )
    fp = fingerprint(taught, tasks, cfg.data, TRAIN, storage, 0)
    rng = np.random.default_rng(0)
    outputs = {
        f"task_{n}": rng.integers(0, 200, (len(TRAIN), *t.cache_shape(storage.for_task(n)))).astype(
            t.cache_dtype(storage.for_task(n))
        )
        for n, t in tasks.items()
    }
    shards = Path(cfg.kd.cache_dir).parent / "shards"
    shards.mkdir(parents=True)
    buf = io.BytesIO()
    np.savez(buf, sample_id=np.asarray(list(TRAIN)), view=np.asarray(0), **outputs)
    (shards / "rank0-view0-batch0.npz").write_bytes(buf.getvalue())
    return merge_shards(shards, cfg.kd.cache_dir, tasks, fp, list(TRAIN)), tasks


def _flip_last_bytes(path: Path) -> None:
    """Overwrite the data's last bytes in place: the size and the header stay as they were."""
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    path.write_bytes(bytes(data))


@pytest.fixture
def written(tmp_path):
    cfg = _cfg(tmp_path)
    teacher = _teacher(tmp_path)
    cache_dir, tasks = _write_cache(cfg, teacher)
    return cfg, teacher, cache_dir, tasks


def test_the_writer_records_each_files_hash_size_and_npy_header(written):
    _, _, cache_dir, _ = written
    sums = json.loads((cache_dir / CHECKSUMS).read_text())
    assert set(sums) == {p.name for p in cache_dir.iterdir()} - {CHECKSUMS, FINGERPRINT}
    for name, record in sums.items():
        assert record == file_record(cache_dir / name), name
    lesions = np.load(cache_dir / "lesions.npy", mmap_mode="r")
    assert sums["lesions.npy"]["header"] == {
        "shape": list(lesions.shape),
        "fortran_order": False,
        "dtype": lesions.dtype.str,
    }
    assert "header" not in sums["index.json"]


def test_a_quick_open_reads_no_array_and_finds_a_resized_or_missing_file(written, monkeypatch):
    _, _, cache_dir, tasks = written

    def no_hashing(path):
        raise AssertionError(f"a quick open hashed {path}")

    monkeypatch.setattr(cache_module, "file_sha256", no_hashing)
    TeacherCache(cache_dir, tasks)
    lesions = cache_dir / "lesions.npy"
    whole = lesions.read_bytes()
    lesions.write_bytes(whole[:-100])
    with pytest.raises(StaleCacheError, match=r"lesions.npy has \d+ bytes, \d+ were written"):
        TeacherCache(cache_dir, tasks)
    lesions.write_bytes(whole + b"\0" * 64)
    with pytest.raises(StaleCacheError, match=r"lesions.npy has \d+ bytes, \d+ were written"):
        TeacherCache(cache_dir, tasks)
    lesions.write_bytes(whole)
    (cache_dir / "index.json").unlink()
    with pytest.raises(StaleCacheError, match="index.json is missing. Rebuild it: mtkd cache-"):
        TeacherCache(cache_dir, tasks)


def test_a_quick_open_finds_a_rewritten_npy_header_of_the_same_size(written):
    _, _, cache_dir, tasks = written
    lesions = cache_dir / "lesions.npy"
    array = np.load(lesions)
    whole = lesions.read_bytes()
    np.save(lesions, array.reshape(array.shape[0], array.shape[1], -1, array.shape[2] // 2))
    assert len(lesions.read_bytes()) == len(whole)  # same size, another shape in the header
    with pytest.raises(StaleCacheError, match=r"lesions.npy has the .npy header .*was written"):
        TeacherCache(cache_dir, tasks)
    lesions.write_bytes(b"\0" * 16 + whole[16:])  # the magic string gone: no header at all
    with pytest.raises(StaleCacheError, match=r"lesions.npy has no readable .npy header"):
        TeacherCache(cache_dir, tasks)


def test_a_same_size_byte_flip_is_found_by_verify_full_and_cache_check(written, capsys):
    cfg, _, cache_dir, tasks = written
    assert cli.main(["cache-check", f"kd.cache_dir={cache_dir}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    listed = json.loads((cache_dir / CHECKSUMS).read_text())
    assert [line.split()[1] for line in printed[:-1]] == list(listed)
    assert printed[-1] == f"teacher cache {cache_dir}: every file matches its checksum"

    _flip_last_bytes(cache_dir / "lesions.npy")
    TeacherCache(cache_dir, tasks)  # quick: the trade-off, same size and header
    with pytest.raises(StaleCacheError, match=r"lesions.npy does not match its checksum"):
        TeacherCache(cache_dir, tasks, full=True)
    full = _cfg(Path(cfg.run.dir), "cache.verify=full")
    with pytest.raises(StaleCacheError, match=r"lesions.npy does not match its checksum"):
        open_checked_cache(full, tasks, TRAIN)
    assert cli.main(["cache-check", f"kd.cache_dir={cache_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "lesions.npy does not match its checksum (damaged)" in err
    assert f"mtkd cache-teacher teacher={Path(cfg.run.dir) / 'teacher.ckpt'} kd.cache_dir=" in err


def test_cache_check_names_a_folder_that_is_no_cache(tmp_path, capsys):
    assert cli.main(["cache-check", f"kd.cache_dir={tmp_path}"]) == 2
    assert "it is incomplete" in capsys.readouterr().err
    assert cli.main(["cache-check"]) == 2
    assert "cache-check needs kd.cache_dir=<DIR>" in capsys.readouterr().err


def test_open_compares_teacher_hashes_without_building_a_teacher(written, monkeypatch):
    cfg, teacher, cache_dir, tasks = written

    def no_network(*args, **kwargs):
        raise AssertionError("the cache check built a teacher network")

    monkeypatch.setattr(ensemble_module, "load_net", no_network)
    named = _cfg(Path(cfg.run.dir), f"kd.teacher={teacher}")
    for run in (cfg, named):  # the recorded teacher, hashed again, and the named one
        assert open_checked_cache(run, tasks, TRAIN).rows.keys() == TRAIN.keys()
    ckpt = torch.load(teacher, weights_only=True)
    ckpt["epoch"] = 1  # "retrained": other bytes at the same path
    torch.save(ckpt, teacher)
    for run in (cfg, named):
        with pytest.raises(StaleCacheError, match="teachers differs"):
            open_checked_cache(run, tasks, TRAIN)


def test_a_cache_of_an_older_format_is_refused_with_the_rebuild_command(written):
    cfg, _, cache_dir, tasks = written
    meta = cache_dir / FINGERPRINT
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 5}))
    with pytest.raises(
        StaleCacheError, match=r"is of format 5.*reads format 6\)\. Rebuild it: mtkd"
    ):
        TeacherCache(cache_dir, tasks)
    with pytest.raises(StaleCacheError, match=r"format_version differs: cache has 5(.|\n)*mtkd c"):
        open_checked_cache(cfg, tasks, TRAIN)


def test_cache_verify_takes_quick_or_full(tmp_path):
    assert _cfg(tmp_path).cache.verify == "quick"
    with pytest.raises(ConfigError, match=r"cache.verify='fast' is not one of \['quick', 'full'\]"):
        _cfg(tmp_path, "cache.verify=fast")
