"""Teacher training end to end: losses fall, checkpoints and configs are written, evaluation
prints and saves per-task metrics, failures stop with clear messages."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from data_modules.datamodule import FundusDataModule, load_samples
from mtkd.config import to_container
from mtkd.modules.checkpoint import load_net
from mtkd.modules.teacher import TeacherModule
from mtkd.modules.weighting import WEIGHTINGS, build_weighting
from mtkd.run_config import load_config
from mtkd.stages import evaluate, fit, make_trainer

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
    # the reported accuracy is the checkpoint's own: recount it from its predictions
    net, tasks, _ = load_net(best)
    right = seen = 0
    with torch.no_grad():
        for batch in FundusDataModule(cfg.data, tasks).test_dataloader():
            has = batch["has"]["dr_grade"]
            pred = net(batch["image"])["dr_grade"].argmax(dim=1)
            right += int((pred[has] == batch["targets"]["dr_grade"][has]).sum())
            seen += int(has.sum())
    assert seen > 0
    assert metrics["test/dr_grade/acc"] == pytest.approx(right / seen, abs=1e-6)


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


@pytest.mark.unit
def test_task_weighting_modes():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(1.0)}
    fixed = build_weighting("fixed", {"a": 1.0, "b": 0.5})
    assert fixed(losses).item() == pytest.approx(2.5)
    unc = build_weighting("uncertainty", {"a": 1.0, "b": 1.0})
    with torch.no_grad():
        unc.log_vars.copy_(torch.tensor([0.0, 1.0]))
    assert unc(losses).item() == pytest.approx(2.0 + torch.exp(torch.tensor(-1.0)).item() + 1.0)
    dwa = build_weighting("dwa", {"a": 1.0, "b": 1.0})
    dwa.end_epoch({"a": 1.0, "b": 1.0})
    dwa.end_epoch({"a": 0.5, "b": 1.0})  # a falls fast -> less weight
    ea, eb = torch.exp(torch.tensor(0.25)), torch.exp(torch.tensor(0.5))
    assert dwa.current()["a"] == pytest.approx((2 * ea / (ea + eb)).item())
    assert dwa.current()["a"] < dwa.current()["b"]


@pytest.mark.unit
def test_evaluation_loss_uses_the_configured_weights_under_every_strategy():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(1.0)}
    for name in WEIGHTINGS.names():
        strategy = build_weighting(name, {"a": 1.0, "b": 0.5})
        strategy.end_epoch({"a": 1.0, "b": 1.0})
        strategy.end_epoch({"a": 0.5, "b": 1.0})
        assert strategy.fixed_total(losses).item() == pytest.approx(2.5), name


@pytest.mark.unit
def test_unknown_weighting_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"run.weighting='nope' is unknown; choose one of: dwa, "):
        build_weighting("nope", {"a": 1.0})


def test_val_loss_is_the_same_under_every_weighting(tiny):
    """val/loss of one network is sum_t w_t L_t whichever strategy trains it (cdr weighs 3)."""
    values, weights = {}, {}
    for name in ("fixed", "uncertainty", "dwa"):
        cfg = load_config("teacher", tiny(**{"run.weighting": name, "tasks.cdr.weight": 3.0}))
        torch.manual_seed(0)
        module = TeacherModule(to_container(cfg))
        weights = {n: t.weight for n, t in module.tasks.items()}
        trainer = make_trainer(cfg, None, [], logger=False)
        dm = FundusDataModule(cfg.data, module.tasks)
        values[name] = trainer.validate(module, datamodule=dm, verbose=False)[0]
    fixed = values["fixed"]
    assert weights["cdr"] == 3.0
    # every validation image is labeled for every task here, so the sum is exact
    assert fixed["val/loss"] == pytest.approx(
        sum(w * fixed[f"val/{n}/loss"] for n, w in weights.items())
    )
    for name in ("uncertainty", "dwa"):
        assert values[name]["val/loss"] == pytest.approx(fixed["val/loss"]), name
