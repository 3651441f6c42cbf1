"""Where evaluate, predict and export write (mtkd/outputs.py): default outputs beside the
checkpoint's own run, never over a file mtkd did not write for that checkpoint, an ``out=``
checked before any work, and a checkpoint's saved data paths read but never generated into."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mtkd.cli import main
from mtkd.config import ConfigError, to_container
from mtkd.outputs import (
    check_output_file,
    check_output_folder,
    check_saved_paths,
    default_output,
    names_checkpoint,
)
from mtkd.run_config import load_config
from mtkd.stages import evaluate
from tests.conftest import TinyRuns


def _fake_checkpoint(path: Path, config: dict | None = None) -> Path:
    """A file read_checkpoint accepts but nothing can evaluate: whatever fails on it after the
    output checks is work the checks did not prevent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"config": config or {"plugins": []}}}, path)
    return path


def _loose_copy(ckpt: Path, folder: Path, saved: dict | None = None) -> Path:
    """``ckpt`` copied to ``folder/dl/model.ckpt`` (not in a run), with ``saved`` (dotted key ->
    value) changed in its saved config: a checkpoint from someone else."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for key, value in (saved or {}).items():
        *parents, last = key.split(".")
        section = state["hyper_parameters"]["config"]
        for part in parents:
            section = section[part]
        section[last] = value
    target = folder / "dl" / "model.ckpt"
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return target


@pytest.mark.unit
def test_default_outputs_go_beside_the_run_or_beside_a_loose_checkpoint(tmp_path):
    run = tmp_path / "runs" / "t"
    assert default_output(run / "checkpoints" / "best.ckpt", "metrics_test.json") == (
        run / "metrics_test.json"
    )
    loose = tmp_path / "loose" / "dl" / "model.ckpt"
    assert default_output(loose, "export") == tmp_path / "loose" / "dl" / "model_export"


@pytest.mark.unit
def test_a_recorded_checkpoint_is_recognised_from_another_folder_or_after_a_move(tmp_path):
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / "best.ckpt"
    assert names_checkpoint(str(ckpt), ckpt)
    assert names_checkpoint("runs/t/checkpoints/best.ckpt", ckpt)  # relative, from elsewhere
    assert names_checkpoint("/cluster/x/t/checkpoints/best.ckpt", ckpt)  # the run was moved
    assert not names_checkpoint(str(ckpt.with_name("last.ckpt")), ckpt)
    assert not names_checkpoint("/cluster/x/u/checkpoints/best.ckpt", ckpt)  # another run
    assert not names_checkpoint(None, ckpt)


@pytest.mark.unit
def test_only_metrics_mtkd_wrote_for_this_checkpoint_are_replaced(tmp_path):
    ckpt = tmp_path / "dl" / "model.ckpt"
    target = tmp_path / "m.json"
    check_output_file(target, ckpt)  # absent
    target.write_text(json.dumps({"checkpoint": str(ckpt), "split": "test", "metrics": {}}))
    check_output_file(target, ckpt)  # ours, from an earlier evaluate
    for foreign in ("my notes", json.dumps({"checkpoint": str(tmp_path / "other.ckpt")}), "[1]"):
        target.write_text(foreign)
        with pytest.raises(ConfigError, match=f"{target} exists and is not a metrics file .*out="):
            check_output_file(target, ckpt)
    with pytest.raises(ConfigError, match="is a folder"):
        check_output_file(tmp_path, ckpt)


@pytest.mark.unit
def test_a_folder_is_written_into_only_where_nothing_of_someone_else_is_in_the_way(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    files = ["model.pt", "model.onnx", "metadata.json"]
    out = tmp_path / "export"
    check_output_folder(out, ckpt, files, "metadata.json", "source_checkpoint")  # absent
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not a file the export writes: no problem
    check_output_folder(out, ckpt, files, "metadata.json", "source_checkpoint")
    (out / "model.pt").write_bytes(b"someone's weights")
    with pytest.raises(ConfigError, match=r"holds model.pt, which mtkd did not write .*out="):
        check_output_folder(out, ckpt, files, "metadata.json", "source_checkpoint")
    (out / "metadata.json").write_text(json.dumps({"source_checkpoint": str(ckpt)}))
    check_output_folder(out, ckpt, files, "metadata.json", "source_checkpoint")  # ours
    (out / "metadata.json").write_text(json.dumps({"source_checkpoint": "/x/other.ckpt"}))
    with pytest.raises(ConfigError, match=r"holds model.pt, metadata.json, which"):
        check_output_folder(out, ckpt, files, "metadata.json", "source_checkpoint")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_folder(out / "notes.txt", ckpt, files, "metadata.json", "source_checkpoint")


@pytest.mark.unit
def test_evaluate_refuses_an_unwritable_or_foreign_output_before_any_work(tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path / "loose" / "dl" / "model.ckpt")
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "metrics.json"
    assert main(["evaluate", f"ckpt={ckpt}", f"out={bad}"]) == 2
    assert f"out={bad} cannot be created: {tmp_path / 'afile'} is a file" in capsys.readouterr().err
    # The default beside a loose checkpoint: <stem>_metrics_<split>.json, here someone's file.
    theirs = tmp_path / "loose" / "dl" / "model_metrics_test.json"
    theirs.write_text("their numbers")
    with pytest.raises(ConfigError, match=f"{theirs} exists and is not a metrics file mtkd wrote"):
        evaluate(str(ckpt), "test", [])
    assert theirs.read_text() == "their numbers"


@pytest.mark.unit
def test_evaluate_never_generates_into_paths_only_the_checkpoint_names(tmp_path):
    theirs = tmp_path / "theirs"
    saved = {
        "data.sources.synthetic.root": theirs / "synthetic",
        "data.preprocess.cache_dir": theirs / "preprocessed",
        "data.split_file": theirs / "splits.json",
    }
    cfg = load_config("teacher", [f"{k}={v}" for k, v in saved.items()])
    ckpt = _fake_checkpoint(tmp_path / "foreign.ckpt", to_container(cfg))
    with pytest.raises(ConfigError, match="names data.sources.synthetic.root=") as refused:
        evaluate(str(ckpt), "test", [], out=str(tmp_path / "m.json"))
    message = str(refused.value)
    assert "\n" not in message
    for key, value in saved.items():
        assert f"{key}={value}" in message
    assert "data.preprocess.cache_dir=<a folder> or null" in message
    assert not theirs.exists()
    # Named on the command line, or already there: nothing to refuse.
    data = tmp_path / "data"
    (data / "synthetic").mkdir(parents=True)
    (data / "synthetic" / "manifest.csv").write_text("")
    given = [
        f"data.sources.synthetic.root={data / 'synthetic'}",
        "data.preprocess.cache_dir=null",
        f"data.split_file={data / 'splits.json'}",
    ]
    check_saved_paths(cfg.data, given, ckpt)
    check_saved_paths(
        cfg.data, ["data.sources={}", "data.preprocess={}", "data.split_file=x"], ckpt
    )
    (theirs / "synthetic").mkdir(parents=True)  # an empty root would be generated into
    with pytest.raises(ConfigError, match="data.sources.synthetic.root="):
        check_saved_paths(cfg.data, given[1:], ckpt)
    (theirs / "synthetic" / "manifest.csv").write_text("")
    (theirs / "preprocessed").mkdir()
    (theirs / "splits.json").write_text("{}")
    check_saved_paths(cfg.data, [], ckpt)  # existing data, cache and split file: read only
    # An adapter's derived-mask folder (mask_dir, fov_dir) is generated into just the same.
    cfg.data.sources.synthetic.options.mask_dir = str(theirs / "masks")
    with pytest.raises(ConfigError, match=r"data.sources.synthetic.options.mask_dir=\S+masks"):
        check_saved_paths(cfg.data, [], ckpt)
    check_saved_paths(cfg.data, ["data.sources.synthetic.options.mask_dir=null"], ckpt)
    (theirs / "masks").mkdir()
    check_saved_paths(cfg.data, [], ckpt)


@pytest.mark.integration
def test_evaluate_of_a_foreign_loose_checkpoint_writes_beside_it_and_generates_nothing(
    runs: TinyRuns, synth_root: Path, tmp_path: Path
):
    theirs = tmp_path / "theirs"
    saved = {
        "data.preprocess.cache_dir": str(theirs / "preprocessed"),
        "data.split_file": str(theirs / "splits.json"),
        "data.sources.synthetic.root": str(theirs / "synthetic"),
    }
    ckpt = _loose_copy(runs.student, tmp_path / "loose", saved)
    mine = tmp_path / "loose" / "metrics_test.json"  # where evaluate used to write
    mine.write_text("my numbers")
    overrides = [
        f"data.sources.synthetic.root={synth_root}",
        "data.preprocess.cache_dir=null",
        "data.split_file=null",
    ]
    metrics = evaluate(str(ckpt), "test", overrides, bootstrap=0)
    written = json.loads((ckpt.parent / "model_metrics_test.json").read_text())
    assert written["checkpoint"] == str(ckpt) and written["metrics"] == pytest.approx(metrics)
    reference = json.loads((runs.student_dir / "metrics_test.json").read_text())["metrics"]
    assert metrics == pytest.approx(reference, nan_ok=True)  # the same data, scored alike
    assert mine.read_text() == "my numbers"
    assert not theirs.exists()


@pytest.mark.integration
def test_predict_and_export_write_beside_a_loose_checkpoint_and_refuse_foreign_files(
    runs: TinyRuns, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from mtkd.commands.exporting import export
    from mtkd.commands.prediction import predict

    ckpt = _loose_copy(runs.student, tmp_path / "loose")
    image = tmp_path / "photo.jpg"
    shutil.copy(sorted((synth_root / "images").glob("*.jpg"))[0], image)
    for old in ("predictions", "export"):  # where they used to write
        (tmp_path / "loose" / old).mkdir()
        (tmp_path / "loose" / old / "predictions.json").write_text("mine")
    predict(ckpt, image)
    assert (ckpt.parent / "model_predictions" / "predictions.json").is_file()
    assert (ckpt.parent / "model_predictions" / "photo.jpg_overlay.png").is_file()
    predict(ckpt, image)  # its own output, replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.jpg_overlay.png").write_bytes(b"someone's picture")
    capsys.readouterr()
    assert main(["predict", f"ckpt={ckpt}", f"images={image}", f"out={other}"]) == 2
    out, err = capsys.readouterr()
    assert "holds photo.jpg_overlay.png, which mtkd did not write" in err and "out=" in err
    assert str(image) not in out  # refused before any image was predicted
    assert (other / "photo.jpg_overlay.png").read_bytes() == b"someone's picture"
    (other / "model.pt").write_bytes(b"someone's weights")
    with pytest.raises(ConfigError, match="holds model.pt, which mtkd did not write"):
        export(ckpt, other)
    assert (other / "model.pt").read_bytes() == b"someone's weights"
    folder = export(ckpt)
    assert folder == ckpt.parent / "model_export"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.onnx", "model.pt"]
    for old in ("predictions", "export"):
        assert [p.name for p in (tmp_path / "loose" / old).iterdir()] == ["predictions.json"]
