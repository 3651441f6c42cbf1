"""Teacher training end to end: losses fall, checkpoints and configs are written, evaluation
prints and saves per-task metrics, failures stop with clear messages."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from data_modules.datamodule import FundusDataModule, load_samples
from mtkd.config import load_config, to_container
from mtkd.modules.teacher import TeacherModule
from mtkd.modules.weighting import TaskWeighting
from mtkd.stages import evaluate, fit

pytestmark = pytest.mark.integration


def test_few_steps_on_one_batch_reduce_the_loss(tiny):
    cfg = load_config("teacher", tiny())
    torch.manual_seed(0)
    module = TeacherModule(to_container(cfg))
    batch = next(iter(FundusDataModule(cfg.data, module.tasks).train_dataloader()))
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = module.weighting(module.supervised_losses(module(batch["image"]), batch))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_fit_writes_checkpoint_config_and_metrics_then_evaluate(tiny, capsys):
    cfg = load_config("teacher", tiny())
    best = fit(cfg)
    run_dir = best.parent.parent
    saved = yaml.safe_load((best.parent / "config.yaml").read_text())
    assert saved["data"]["image_size"] == 64 and saved["stage"] == "teacher"
    val = json.loads((run_dir / "metrics_val.json").read_text())["metrics"]
    for task in cfg.tasks:
        assert f"val/{task}/loss" in val
    assert {"val/dr_grade/kappa", "val/lesions/dice", "val/landmarks/dist_px", "val/cdr/r2"} <= set(
        val
    )
    ckpt = torch.load(best, map_location="cpu", weights_only=True)  # loadable safely
    assert ckpt["hyper_parameters"]["config"]["tasks"].keys() == cfg.tasks.keys()
    capsys.readouterr()
    metrics = evaluate(str(best), "test", [])
    printed = capsys.readouterr().out
    assert "dr_grade" in printed and "kappa=" in printed
    stored = json.loads((run_dir / "metrics_test.json").read_text())
    assert stored["metrics"] == pytest.approx(metrics)
    assert 0.0 <= metrics["test/dr_grade/acc"] <= 1.0


def test_patient_level_split_and_label_fraction(tiny):
    cfg = load_config("teacher", tiny(**{"data.label_fraction": 0.5}))
    samples = load_samples(cfg.data)
    sides = {}
    for s in samples:
        sides.setdefault(s.patient_id, set()).add(s.split)
    assert all(len(v) == 1 for v in sides.values())
    train = [s for s in samples if s.split == "train"]
    unlabeled = [s for s in train if not s.labels]
    assert 0 < len(unlabeled) < len(train)
    assert all(s.labels for s in samples if s.split != "train")  # evaluation keeps its labels


def test_non_finite_loss_stops_with_a_clear_message(tiny):
    module = TeacherModule(to_container(load_config("teacher", tiny())))
    with pytest.raises(FloatingPointError, match="non-finite terms: \\['cdr'\\].*Stopping"):
        module.guard_finite(
            torch.tensor(float("nan")), {"cdr": torch.tensor(float("inf")), "x": torch.tensor(1.0)}
        )


def test_task_weighting_modes():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(1.0)}
    fixed = TaskWeighting("fixed", {"a": 1.0, "b": 0.5})
    assert fixed(losses).item() == pytest.approx(2.5)
    unc = TaskWeighting("uncertainty", {"a": 1.0, "b": 1.0})
    with torch.no_grad():
        unc.log_vars.copy_(torch.tensor([0.0, 1.0]))
    assert unc(losses).item() == pytest.approx(2.0 + torch.exp(torch.tensor(-1.0)).item() + 1.0)
    dwa = TaskWeighting("dwa", {"a": 1.0, "b": 1.0})
    dwa.end_epoch({"a": 1.0, "b": 1.0})
    dwa.end_epoch({"a": 0.5, "b": 1.0})  # a falls fast -> less weight
    ea, eb = torch.exp(torch.tensor(0.25)), torch.exp(torch.tensor(0.5))
    assert dwa.current()["a"] == pytest.approx((2 * ea / (ea + eb)).item())
    assert dwa.current()["a"] < dwa.current()["b"]
