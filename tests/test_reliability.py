"""Bad inputs and faults that used to lose work or give a silently wrong result (issue 13): each
is refused before any work with a message naming the input and the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_modules.datamodule import load_samples
from data_modules.manifest import read_manifest, write_manifest
from mtkd.config import ConfigError
from mtkd.kd.cache import StaleCacheError, TeacherCache
from mtkd.locks import LockedError, directory_lock, lock_path
from mtkd.modules.checkpoint import read_checkpoint
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, fit, open_checked_cache
from mtkd.tasks import build_tasks
from tests.conftest import tiny_overrides

MANIFEST_HEAD = "sample_id,patient_id,split,image,label:dr_grade,label:cdr\n"


def _manifest(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(MANIFEST_HEAD + "".join(r + "\n" for r in rows))
    return path


# -- 5. manifest split values ---------------------------------------------------------------------


@pytest.mark.unit
def test_manifest_split_variants_are_accepted_and_others_refused(tmp_path):
    rows = [
        "a,a, Train ,a.png,1,",
        "b,b,VAL,b.png,1,",
        "c,c,validation,c.png,1,",
        "d,d,test ,d.png,",
    ]
    splits = [s.split for s in read_manifest(_manifest(tmp_path, rows))]
    assert splits == ["train", "val", "val", "test"]
    with pytest.raises(ValueError, match=r"line 3: split='holdout'.*\['test', 'train', 'val'"):
        read_manifest(_manifest(tmp_path, ["a,a,train,a.png,1,", "b,b,holdout,b.png,1,"]))


@pytest.mark.unit
def test_manifest_paths_that_climb_out_of_its_folder_are_refused_unless_allowed(tmp_path):
    inside = tmp_path / "set"
    inside.mkdir()
    rows = ["a,a,train,a.png,1,", "b,b,train,../../b.png,1,", "c,c,train,sub/../c.png,1,"]
    manifest = _manifest(inside, rows)
    with pytest.raises(ValueError, match=r"1 path\(s\) lead out of its folder.*\n  line 3: image="):
        read_manifest(manifest)
    allowed = read_manifest(manifest, allow_outside_root=True)
    assert Path(allowed[1].image) == manifest.parent / "../../b.png"
    from data_modules.manifest import manifest_source

    assert len(manifest_source(manifest, allow_outside_root=True)) == 3
    (tmp_path / "abs").mkdir()
    absolute = _manifest(tmp_path / "abs", [f"a,a,train,{tmp_path / 'elsewhere.png'},1,"])
    assert read_manifest(absolute)[0].image == str(tmp_path / "elsewhere.png")  # taken as is
    # A folder linked into the manifest's folder is the user's choice, not a climb.
    (tmp_path / "photos").mkdir()
    (inside / "linked").symlink_to(tmp_path / "photos")
    linked = read_manifest(_manifest(inside, ["a,a,train,linked/a.png,1,"]))
    assert linked[0].image == str(inside / "linked" / "a.png")


# -- 2. labels validated when samples are loaded ------------------------------------------------


@pytest.mark.unit
def test_non_finite_manifest_label_is_refused_with_file_line_and_value(tmp_path):
    with pytest.raises(ValueError, match=r"manifest\.csv line 3: label:cdr='nan' is not a finite"):
        read_manifest(_manifest(tmp_path, ["a,a,val,a.png,1,0.3", "b,b,val,b.png,1,nan"]))


def _manifest_cfg(synth_root, tmp_path, rows_fn):
    """A copy of the synthetic manifest edited by ``rows_fn(samples)``, as the only source."""
    samples = read_manifest(synth_root / "manifest.csv")
    write_manifest(rows_fn(samples), synth_root.parent / f"edited-{tmp_path.name}.csv")
    over = tiny_overrides(synth_root, tmp_path)
    over = [o for o in over if not o.startswith("data.sources.synthetic")]
    source = "{kind: manifest, root: " + str(synth_root.parent / f"edited-{tmp_path.name}.csv")
    return load_config("teacher", [*over, "~data.sources.synthetic", f"data.sources.m={source}}}"])


@pytest.mark.unit
def test_out_of_range_labels_are_listed_with_sample_row_and_value(synth_root, tmp_path):
    import dataclasses

    def damage(samples):
        out = list(samples)
        out[3] = dataclasses.replace(out[3], labels={**out[3].labels, "dr_grade": 7.0})
        out[5] = dataclasses.replace(out[5], points={**out[5].points, "fovea": (-40.0, 10.0)})
        return out

    cfg = _manifest_cfg(synth_root, tmp_path, damage)
    tasks = build_tasks(dict(cfg.tasks))
    with pytest.raises(ValueError) as err:
        load_samples(cfg.data, tasks=tasks)
    message = str(err.value)
    assert message.startswith("2 bad label(s)")
    assert "line 5): task 'dr_grade': dr_grade=7.0 is not a class index in [0, 5)" in message
    assert "line 7): task 'landmarks': point fovea=" in message and "outside the image" in message


# -- 6. a task whose label no source provides -----------------------------------------------------


@pytest.mark.unit
def test_task_without_labels_is_refused_or_named_kd_only(synth_root, tmp_path):
    cfg = load_config(
        "teacher", tiny_overrides(synth_root, tmp_path, **{"tasks.cdr.labels": "[cup_ratio]"})
    )
    tasks = build_tasks(dict(cfg.tasks))
    with pytest.raises(
        ValueError, match=r"task 'cdr': no sample .*'labels': \[.*'cdr'.*~tasks\.cdr"
    ):
        load_samples(cfg.data, tasks=tasks)
    with pytest.warns(UserWarning, match="task 'cdr'.*KD-only"):
        load_samples(cfg.data, tasks=tasks, teacher_covers=True)


# -- bad images: all named before any work, or skipped --------------------------------------------


def _bad_image_cfg(synth_root, tmp_path):
    """The synthetic manifest with samples 2-5 pointing at a truncated JPEG, a zero-byte PNG,
    a text file named .jpg and a missing path."""
    import dataclasses

    bad = tmp_path / "bad"
    bad.mkdir()

    def damage(samples):
        jpeg = Path(samples[2].image).read_bytes()
        (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
        (bad / "empty.png").write_bytes(b"")
        (bad / "text.jpg").write_text("sample_id,label\n")
        names = ["truncated.jpg", "empty.png", "text.jpg", "missing.jpg"]
        out = list(samples)
        for i, name in enumerate(names, start=2):
            out[i] = dataclasses.replace(out[i], image=str(bad / name))
        return out

    cfg = _manifest_cfg(synth_root, tmp_path, damage)
    return cfg, [s.sample_id for s in read_manifest(synth_root / "manifest.csv")[2:6]]


@pytest.mark.integration
def test_bad_images_are_all_named_before_work_or_skipped(synth_root, tmp_path, monkeypatch):
    import data_modules.preprocess as preprocess

    cfg, bad_ids = _bad_image_cfg(synth_root, tmp_path)
    tasks = build_tasks(dict(cfg.tasks))
    with pytest.raises(ValueError) as err:
        load_samples(cfg.data, tasks=tasks)
    message = str(err.value)
    assert message.startswith("4 bad image(s)") and "data.on_bad_image=skip" in message
    for sample_id, reason in zip(
        bad_ids, ["is truncated", "is empty (0 bytes)", "cannot identify", "No such file"]
    ):
        assert any(sample_id in line and reason in line for line in message.splitlines())

    # Checked once: the 44 good images are remembered; only the bad ones are decoded again.
    decoded = []
    load = preprocess.load_image
    monkeypatch.setattr(
        preprocess, "load_image", lambda ref, **kw: decoded.append(ref) or load(ref, **kw)
    )
    cfg.data.on_bad_image = "skip"
    with pytest.warns(UserWarning, match=r"leaving out 4 of 48 samples") as warned:
        kept = load_samples(cfg.data, tasks=tasks)
    (skipped,) = [str(w.message) for w in warned if "leaving out" in str(w.message)]
    assert all(i in skipped for i in bad_ids)
    assert len(kept) == 44 and not set(bad_ids) & {s.sample_id for s in kept}
    assert sorted(Path(r).name for r in decoded) == ["text.jpg", "truncated.jpg"]

    cfg.trainer.max_epochs = 1
    with pytest.warns(UserWarning, match="leaving out 4"):
        assert fit(cfg).is_file()  # trains on the good images


# -- 7. numeric ranges ---------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "override, message",
    [
        ("kd.alpha=2", r"kd.alpha=2.0 is out of range: it must be in \[0, 1\]"),
        ("kd.temperature=0", r"kd.temperature=0.0 .* > 0"),
        ("trainer.max_epochs=0", r"trainer.max_epochs=0 .* >= 1"),
        ("data.batch_size=-4", r"data.batch_size=-4 .* >= 1"),
        ("kd.tasks.dr_grade={alpha: 1.5}", r"kd.tasks.dr_grade.alpha=1.5 .* \[0, 1\]"),
        ("data.val_fraction=0.9", r"val_fraction \+ data.test_fraction = 1.05 .* < 1"),
        ("optim.encoder_lr_mult=0", r"optim.encoder_lr_mult=0.0 .* > 0"),
        ("optim.freeze_encoder_epochs=-1", r"optim.freeze_encoder_epochs=-1 .* >= 0"),
    ],
)
def test_numbers_out_of_range_are_refused_with_key_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("distill", [override])


# -- 3. one writer per directory -----------------------------------------------------------------


@pytest.mark.unit
def test_second_writer_fails_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    with directory_lock(run, "first"):
        with pytest.raises(LockedError, match=rf"pid {os.getpid()}, started 20\d\d-"):
            with directory_lock(run, "second"):
                pass
    assert not lock_path(run).exists()  # released
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    stale = {"pid": int(dead.stdout), "host": os.uname().nodename, "started": 0, "purpose": "x"}
    lock_path(run).write_text(json.dumps(stale))
    with directory_lock(run, "after a kill"):
        assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()


@pytest.mark.unit
def test_fit_refuses_a_run_directory_in_use(synth_root, tmp_path):
    cfg = load_config("teacher", tiny_overrides(synth_root, tmp_path))
    with directory_lock(tmp_path, "another train-teacher"):
        with pytest.raises(LockedError, match="another train-teacher"):
            fit(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


# -- 9. safe loading -----------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.unit
def test_resume_never_unpickles_code_even_when_the_environment_allows_it(
    synth_root, tmp_path, monkeypatch
):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, crafted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cfg = load_config("teacher", tiny_overrides(synth_root, tmp_path, **{"run.resume": crafted}))
    with pytest.raises(ValueError, match="cannot be read safely"):
        fit(cfg)
    assert not marker.exists()


@pytest.mark.unit
def test_checkpoint_plugins_are_imported_only_when_named(tmp_path, monkeypatch):
    (tmp_path / "mtkd_test_plugin_xyz.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = tmp_path / "plugin.ckpt"
    torch.save({"hyper_parameters": {"config": {"plugins": ["mtkd_test_plugin_xyz"]}}}, ckpt)
    with pytest.raises(ConfigError, match="MTKD_PLUGINS=mtkd_test_plugin_xyz mtkd"):
        read_checkpoint(ckpt)
    assert "mtkd_test_plugin_xyz" not in sys.modules
    monkeypatch.setenv("MTKD_PLUGINS", "mtkd_test_plugin_xyz")
    assert read_checkpoint(ckpt)["hyper_parameters"]["config"]["plugins"] == [
        "mtkd_test_plugin_xyz"
    ]


# -- 4, 8, 10. the teacher cache -----------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_and_cache(synth_root, tmp_path_factory):
    """A tiny teacher and a cache built from it, copied per test."""
    root = tmp_path_factory.mktemp("cache")
    teacher = fit(load_config("teacher", tiny_overrides(synth_root, root / "teacher")))
    cfg = load_config("distill", [*tiny_overrides(synth_root, root), f"cache.teacher=[{teacher}]"])
    cache_teacher(cfg)
    return teacher, Path(cfg.kd.cache_dir)


def _distill_cfg(synth_root, tmp_path, cache_dir, teacher_ckpt):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    cfg = load_config(
        "distill", [*tiny_overrides(synth_root, tmp_path), f"cache.teacher=[{teacher_ckpt}]"]
    )
    return cfg, copy, build_tasks(dict(cfg.tasks))


@pytest.mark.integration
def test_cache_of_a_retrained_teacher_is_refused_without_kd_teacher(
    synth_root, tmp_path, teacher_and_cache
):
    teacher, cache_dir = teacher_and_cache
    moved = tmp_path / "teacher.ckpt"
    shutil.copy(teacher, moved)
    cfg, copy, tasks = _distill_cfg(synth_root, tmp_path, cache_dir, moved)
    fp = json.loads((copy / "fingerprint.json").read_text())
    fp["teacher_files"] = {str(moved): fp["teachers"][0]}  # as if built from the copy
    (copy / "fingerprint.json").write_text(json.dumps(fp))
    assert not cfg.kd.teacher
    open_checked_cache(cfg, tasks)  # same file: accepted
    ckpt = torch.load(moved, weights_only=True)
    ckpt["epoch"] += 1  # "retrained": other bytes at the same path
    torch.save(ckpt, moved)
    with pytest.raises(StaleCacheError, match="teachers differs"):
        open_checked_cache(cfg, tasks)
    moved.unlink()
    with pytest.raises(StaleCacheError, match="no longer exist.*kd.teacher=<ckpt>"):
        open_checked_cache(cfg, tasks)


@pytest.mark.integration
def test_damaged_truncated_or_missing_cache_files_are_named_with_the_rebuild_command(
    synth_root, tmp_path, teacher_and_cache
):
    teacher, cache_dir = teacher_and_cache
    cfg, copy, tasks = _distill_cfg(synth_root, tmp_path, cache_dir, teacher)
    lesions = copy / "lesions.npy"
    data = bytearray(lesions.read_bytes())
    data[-10:] = bytes(255 - b for b in data[-10:])  # overwritten bytes, same size
    lesions.write_bytes(bytes(data))
    TeacherCache(copy, tasks)  # a quick open checks sizes and headers only: cache.verify=full
    with pytest.raises(
        StaleCacheError, match=r"lesions.npy does not match its checksum.*cache-teacher teacher=/"
    ):
        TeacherCache(copy, tasks, full=True)
    lesions.write_bytes(bytes(data[:-100]))
    with pytest.raises(StaleCacheError, match=r"lesions.npy has \d+ bytes, \d+ were written"):
        TeacherCache(copy, tasks)
    (copy / "index.json").unlink()
    with pytest.raises(StaleCacheError, match="index.json is missing"):
        TeacherCache(copy, tasks)
    assert np.load(cache_dir / "dr_grade.npy", mmap_mode="r").shape[0] > 0  # original untouched


@pytest.mark.integration
def test_orphan_partial_folders_are_removed_by_the_next_cache_teacher(
    synth_root, tmp_path, teacher_and_cache
):
    teacher, _ = teacher_and_cache
    cfg = load_config(
        "distill", [*tiny_overrides(synth_root, tmp_path), f"cache.teacher=[{teacher}]"]
    )
    cache_dir = Path(cfg.kd.cache_dir)
    orphan = cache_dir.parent / f".{cache_dir.name}.partial-deadbeef"
    orphan.mkdir(parents=True)
    (orphan / "rank0-view0-batch0.npz").write_bytes(b"half")
    cache_teacher(cfg)
    assert not orphan.exists()
    assert (cache_dir / "fingerprint.json").exists()


@pytest.mark.integration
def test_cache_teacher_never_replaces_a_folder_it_did_not_write(
    synth_root, tmp_path, teacher_and_cache
):
    teacher, cache_dir = teacher_and_cache
    run_dir = Path(teacher).parent.parent  # the teacher's own run: its checkpoints, config, logs
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    for target in (run_dir, synth_root):
        cfg = load_config(
            "distill",
            [
                *tiny_overrides(synth_root, tmp_path),
                f"cache.teacher=[{teacher}]",
                f"kd.cache_dir={target}",
            ],
        )
        with pytest.raises(ValueError, match=f"kd.cache_dir={target} is a folder that is not a"):
            cache_teacher(cfg)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert (synth_root / "manifest.csv").exists()
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    (copy / "notes.txt").write_text("mine")
    cfg = load_config(
        "distill",
        [
            *tiny_overrides(synth_root, tmp_path),
            f"cache.teacher=[{teacher}]",
            f"kd.cache_dir={copy}",
        ],
    )
    with pytest.raises(ValueError, match="did not write \\(notes.txt\\)"):
        cache_teacher(cfg)
    (copy / "notes.txt").unlink()
    cache_teacher(cfg)  # a cache holding only its own files is rebuilt in place
    assert (copy / "fingerprint.json").exists()


# -- predict keeps the good images; resume names the tasks that differ --------------------------


@pytest.mark.integration
def test_predict_writes_the_good_images_and_lists_the_bad_ones(
    synth_root, tmp_path, teacher_and_cache, capsys
):
    from mtkd.cli import main
    from mtkd.commands.prediction import predict

    teacher, _ = teacher_and_cache
    photos = tmp_path / "photos"
    photos.mkdir()
    good = [Path(s.image) for s in read_manifest(synth_root / "manifest.csv")[:2]]
    for image in good:
        shutil.copy(image, photos)
    jpeg = good[0].read_bytes()
    (photos / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (photos / "text.jpg").write_text("not an image")
    payload = predict(teacher, photos, tmp_path / "out")
    assert len(payload["predictions"]) == 2
    assert [Path(e["image"]).name for e in payload["unreadable"]] == ["text.jpg", "truncated.jpg"]
    assert "truncated" in payload["unreadable"][1]["reason"]
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == payload
    assert "2 image(s) could not be read" in capsys.readouterr().out
    for image in good:
        (photos / image.name).unlink()  # only the bad ones left: nothing to write, exit 2
    assert main(["predict", f"ckpt={teacher}", f"images={photos}", f"out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "no image could be read" in err and "text.jpg" in err and "truncated.jpg" in err
    assert not (tmp_path / "x").exists()  # nothing readable: nothing written, no marker


@pytest.mark.integration
def test_predict_interrupted_half_way_may_be_rerun(
    synth_root, tmp_path, teacher_and_cache, monkeypatch
):
    """A predict killed after its first overlay leaves a marker naming its checkpoint, so the
    rerun replaces the overlays (it used to refuse them as someone else's files)."""
    import mtkd.commands.prediction as predict_module

    teacher, _ = teacher_and_cache
    photos = tmp_path / "photos"
    photos.mkdir()
    for sample in read_manifest(synth_root / "manifest.csv")[:2]:
        shutil.copy(sample.image, photos)
    out = tmp_path / "out"
    write_overlay = predict_module.write_overlay
    drawn = []

    def interrupted(path, *args):
        if drawn:
            raise KeyboardInterrupt
        drawn.append(path)
        write_overlay(path, *args)

    monkeypatch.setattr(predict_module, "write_overlay", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict(teacher, photos, out)
    assert drawn[0].is_file()
    assert json.loads((out / "predictions.json").read_text())["complete"] is False
    monkeypatch.setattr(predict_module, "write_overlay", write_overlay)
    payload = predict_module.predict(teacher, photos, out)
    assert payload["complete"] is True and len(payload["predictions"]) == 2
    assert json.loads((out / "predictions.json").read_text()) == payload


@pytest.mark.integration
def test_resume_with_another_task_set_names_the_tasks_that_differ(
    synth_root, tmp_path, teacher_and_cache
):
    teacher, _ = teacher_and_cache
    over = [*tiny_overrides(synth_root, tmp_path, **{"run.resume": teacher}), "~tasks.cdr"]
    with pytest.raises(ValueError, match=r"run.resume=.* \(differing: \['cdr'\]\)"):
        fit(load_config("teacher", over))
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


# -- the message pattern: one line with the fix, MTKD_DEBUG=1 for the traceback -------------------


@pytest.mark.unit
def test_cli_names_yaml_syntax_errors_with_file_line_and_column(tmp_path, monkeypatch, capsys):
    from mtkd.cli import main
    from mtkd.config import BUILTIN_CONFIGS

    tree = tmp_path / "experiments"
    shutil.copytree(BUILTIN_CONFIGS, tree)
    (tree / "teacher.yaml").write_text((tree / "teacher.yaml").read_text() + "broken: [1, 2\n")
    monkeypatch.setenv("MTKD_EXPERIMENTS", str(tree))
    assert main(["train-teacher"]) == 2
    err = capsys.readouterr().err
    assert f"{tree / 'teacher.yaml'}:" in err and "YAML syntax error" in err
    assert "Traceback" not in err


@pytest.mark.unit
def test_cli_refuses_a_file_shaped_run_dir_before_work(synth_root, tmp_path, capsys):
    from mtkd.cli import main

    (tmp_path / "run").write_text("not a folder")
    assert (
        main(
            [
                "train-teacher",
                *tiny_overrides(synth_root, tmp_path, **{"run.dir": tmp_path / "run"}),
            ]
        )
        == 2
    )
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.unit
def test_cli_turns_any_failure_into_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import mtkd.cli as cli
    from mtkd.commands.args import Command, Spec

    def broken(args):
        raise TypeError("boom")

    def synth_running(main):
        return lambda: {"synth": Command("synth", "", Spec({}), main)}

    monkeypatch.setattr(cli, "command_table", synth_running(broken))
    assert cli.main(["synth"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mtkd synth: error: unexpected TypeError: boom. Rerun with MTKD_DEBUG=1 for the traceback "
        "and report it"
    )
    monkeypatch.setattr(cli, "command_table", synth_running(lambda a: open("/nonexistent/x", "w")))
    assert cli.main(["synth"]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    monkeypatch.setenv("MTKD_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["synth"])
