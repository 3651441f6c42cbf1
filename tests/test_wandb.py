"""W&B logging without an account or network: what an offline run records (metrics, config,
summary, image panel, confusion matrices, teacher vs student table), when ``logger=wandb`` falls
back to offline, and that resuming from a checkpoint continues the same run."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
from wandb.proto import wandb_internal_pb2 as pb

from mtkd.run_config import load_config
from mtkd.stages import fit
from mtkd.tracking.wandb_logger import RUN_ID_KEY, teacher_student_rows, wandb_offline_reason
from mtkd.tracking.wandb_panels import label_map

#: LevelDB log format of ``run-<id>.wandb``: 7-byte file header, then 32 KiB blocks of chunks,
#: each ``crc32 (4) | length (2, little endian) | type (1: full, 2: first, 3: middle, 4: last)``.
BLOCK, HEADER = 32768, 7

FAST = {
    "trainer.limit_train_batches": 2,
    "trainer.num_sanity_val_steps": 0,
    "logger": "wandb_offline",
}


def read_records(path: Path) -> list[pb.Record]:
    """Every protobuf record of an offline run file."""
    data, pos, chunks, records = path.read_bytes(), HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + HEADER])
        if left < HEADER or kind == 0:  # block trailer padding
            pos += left
            continue
        chunks += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunks))
            chunks = b""
    return records


def item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """What an offline run file says: run metadata, config, history rows and final summary."""

    def __init__(self, path: Path) -> None:
        self.config: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            elif kind == "summary":
                for item in record.summary.update:
                    self.summary[item_key(item)] = json.loads(item.value_json)
                continue
            elif kind == "history":
                self.history.append(
                    {item_key(i): json.loads(i.value_json) for i in record.history.item}
                )
                continue
            else:
                continue
            for item in updates:
                self.config[item_key(item)] = json.loads(item.value_json)

    def logged(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """The run's offline segments in start order (a resumed run has one per process start)."""
    wandb.finish()  # flush the run fit() leaves open for a later stage
    return [OfflineRun(p) for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]


@pytest.mark.integration
def test_offline_distill_run_records_metrics_config_summary_pictures_and_teacher_table(
    tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mtkd")
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    teacher = {"val/dr_grade/kappa": 0.5, "val/loss": 3.0, "val/cdr/mae": 0.25}
    (teacher_dir / "metrics_val.json").write_text(json.dumps({"metrics": teacher}))
    cfg = load_config(
        "distill",
        tiny(
            **FAST,
            kd="none",
            **{
                "cache.teacher": f"[{teacher_dir}/checkpoints/best.ckpt]",
                "logger.tags": "[smoke, kd-none]",
                "logger.group": "exp1",
            },
        ),
    )
    fit(cfg)
    (run,) = offline_runs(tmp_path)
    student = json.loads((tmp_path / "metrics_val.json").read_text())["metrics"]

    assert f"wandb sync {tmp_path}/wandb/offline-run-*-{run.run.run_id}" in caplog.text
    assert (run.run.run_group, run.run.job_type, list(run.run.tags)) == (
        "exp1",
        "distill",
        ["smoke", "kd-none"],
    )
    assert run.config["stage"] == "distill"
    assert run.config["data"]["image_size"] == 64
    assert run.config["kd"]["mode"] == "none"
    assert run.config["logger"]["kind"] == "wandb_offline"

    for key in ("val/dr_grade/kappa", "val/anatomy/dice", "val/landmarks/dist", "val/cdr/mae"):
        assert run.logged(key), key
        assert run.summary[key] == pytest.approx(student[key])  # the best checkpoint's values
    # per-step-and-epoch values get Lightning's _step/_epoch suffixes
    history_keys = set().union(*run.history)
    assert "train/loss_epoch" in history_keys
    assert any(k.startswith("train/dr_grade/loss") for k in history_keys)
    assert run.summary["summary/metric"] == "val/score"
    assert run.summary["summary/score"] == pytest.approx(student["val/score"])
    assert run.summary["summary/checkpoint"].endswith("best.ckpt")

    # one panel of the 4 fixed val images per validation (epoch + final), one matrix per class task
    assert run.logged("val/panel/count") == [4, 4]
    captions = run.logged("val/panel/captions")
    ids = [[c.split(";")[0] for c in epoch] for epoch in captions]
    assert ids[0] == ids[1] and len(set(ids[0])) == 4  # the same 4 images every time
    assert all("dr_grade " in c and "(true " in c for c in captions[0])
    masks, boxes = run.logged("val/panel/all_masks")[0], run.logged("val/panel/all_boxes")[0]
    assert set(masks[0]) == {
        "lesions predicted",
        "lesions true",
        "anatomy predicted",
        "anatomy true",
    }
    assert set(boxes[0]) == {"landmarks predicted", "landmarks true"}
    for task, classes in (("dr_grade", 5), ("dme_risk", 3), ("glaucoma", 2)):
        assert run.logged(f"val/{task}/confusion_matrix_table/nrows") == [classes**2] * 2

    (table,) = run.logged("val/teacher_vs_student/nrows")
    (table_file,) = tmp_path.glob(
        "wandb/offline-run-*/files/media/table/val/teacher_vs_student*.json"
    )
    rows = {r[0]: r[1:] for r in json.loads(table_file.read_text())["data"]}
    assert table == len(rows) == len(set(student) | set(teacher))
    assert rows["val/dr_grade/kappa"] == pytest.approx(
        [0.5, student["val/dr_grade/kappa"], student["val/dr_grade/kappa"] - 0.5]
    )
    assert rows["val/dr_grade/acc"][0] is None  # the teacher file has no acc


@pytest.mark.integration
def test_resuming_from_last_checkpoint_continues_the_same_wandb_run(tiny, tmp_path: Path) -> None:
    fit(load_config("teacher", tiny(**FAST, **{"logger.log_images": False})))
    last = tmp_path / "checkpoints" / "last.ckpt"
    first_id = torch.load(last, map_location="cpu", weights_only=True)[RUN_ID_KEY]
    resumed = tiny(
        **FAST, **{"logger.log_images": False, "run.resume": last, "trainer.max_epochs": 2}
    )
    fit(load_config("teacher", resumed))

    first, second = offline_runs(tmp_path)
    assert first.run.run_id == second.run.run_id == first_id
    assert torch.load(last, map_location="cpu", weights_only=True)[RUN_ID_KEY] == first_id
    # 2 training steps per epoch: the resumed segment trains epoch 1, not epoch 0 again
    epoch_ends = [
        [r["trainer/global_step"] for r in run.history if "train/loss_epoch" in r]
        for run in (first, second)
    ]
    assert len(epoch_ends[0]) == len(epoch_ends[1]) == 1
    assert epoch_ends[1][0] == epoch_ends[0][0] + 2


@pytest.mark.unit
def test_wandb_falls_back_to_offline_and_says_why(monkeypatch, tmp_path: Path) -> None:
    assert wandb_offline_reason("wandb_offline") == "logger=wandb_offline"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline_reason("wandb") == "WANDB_MODE=offline"

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    wandb.teardown()
    assert "no W&B credentials" in wandb_offline_reason("wandb")

    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    wandb.teardown()
    assert wandb_offline_reason("wandb").startswith("cannot reach http://127.0.0.1:9")
    monkeypatch.undo()
    wandb.teardown()


@pytest.mark.unit
def test_teacher_student_rows_pair_metrics_and_leave_gaps_empty() -> None:
    rows = teacher_student_rows(
        {"val/a/kappa": 0.5, "val/loss": 2.0, "test/a/kappa": 0.1},
        {"val/a/kappa": 0.75, "val/b/dice": 0.25},
    )
    assert rows == [
        ["val/a/kappa", 0.5, 0.75, 0.25],
        ["val/b/dice", None, 0.25, None],
        ["val/loss", 2.0, None, None],
    ]


@pytest.mark.unit
def test_label_map_draws_later_classes_over_earlier_ones() -> None:
    planes = torch.zeros(3, 2, 2)
    planes[0] = 1.0  # vessels everywhere
    planes[1, 0] = 0.9  # disc on the top row
    planes[2, 0, 0] = 0.6  # cup in the corner
    assert label_map(planes).tolist() == [[3, 2], [1, 1]]
