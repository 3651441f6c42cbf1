"""mtkd study at toy size (1 fraction x 2 seeds x 2 arms, 64 px, 1 epoch): table, plot and JSON
written; the KD arm trains from the fraction's teacher cache and the no-KD arm does not; a
rerun trains nothing; settings that define the protocol cannot change under a finished study."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

import mtkd.commands.study_runs
import mtkd.stages
from mtkd.commands.demo_runs import CLASSIFICATION_KD_ALPHA
from mtkd.commands.study_runs import load_study, run_study, stage_configs, t_interval, trained
from tests.conftest import PNG_MAGIC


@pytest.mark.unit
def test_t_interval_by_hand_and_with_one_seed() -> None:
    """Values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> 2 ± 4.302653 / sqrt(3)."""
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2 - half, 2 + half))
    assert t_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)
    mean, lo, hi = t_interval([0.7])
    assert mean == 0.7 and math.isnan(lo) and math.isnan(hi)


@pytest.mark.unit
def test_study_refuses_what_it_sets_itself_and_bad_values() -> None:
    with pytest.raises(ValueError, match=r"the study sets \['data.label_fraction', 'run.dir'\]"):
        load_study("label_efficiency", ["run.dir=x", "data.label_fraction=0.5"])
    with pytest.raises(ValueError, match=r"study.fractions=\[0.0\].*study.teacher='some'"):
        load_study("label_efficiency", ["study.fractions=[0.0]", "study.teacher=some"])
    with pytest.raises(ValueError, match="valid keys: study.name"):
        load_study("label_efficiency", ["study.epochs=3"])
    with pytest.raises(ValueError, match=r"the study sets \['run.seed'\]"):
        load_study("label_efficiency", ["study.student_overrides=[run.seed=3]"])


@pytest.mark.unit
def test_teacher_and_student_overrides_reach_their_own_stages_only() -> None:
    """A pretrained teacher and student in one study: each side's overrides reach its stage."""
    study, overrides = load_study(
        "label_efficiency",
        [
            "study.teacher_overrides=[model.encoder=resnet34]",
            "study.student_overrides=[model=teacher]",
        ],
    )
    configs = stage_configs(study, overrides)
    assert configs["teacher"].model.encoder == "resnet34"
    for arm in ("student_kd", "student_nokd"):  # the teacher's network, its encoder untouched
        assert configs[arm].model.encoder == "resnet18"


@pytest.mark.unit
def test_trust_teacher_weighs_the_teacher_on_the_kd_arms_classification_heads_only() -> None:
    trusted = stage_configs(*load_study("label_efficiency", ["study.trust_teacher=true"]))
    default = stage_configs(*load_study("label_efficiency", ["study.trust_teacher=false"]))
    alphas = {t: o.alpha for t, o in trusted["student_kd"].kd.tasks.items()}
    assert alphas == {t: CLASSIFICATION_KD_ALPHA for t in ("dr_grade", "dme_risk", "glaucoma")}
    assert not default["student_kd"].kd.tasks
    assert trusted["student_nokd"].kd.teacher is None


@pytest.mark.integration
def test_study_writes_table_plot_json_and_resumes_without_training(
    tiny,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mtkd")
    out = tmp_path / "study"
    stage = [o for o in tiny() if not o.startswith(("run.dir=", "kd.cache_dir=", "trainer.max"))]
    args = [
        "study.fractions=[0.5]",
        "study.seeds=[0,1]",
        "study.teacher=fraction",  # the default file's is all
        "study.teacher_epochs=1",
        "study.student_epochs=1",
        f"study.out={out}",
        *stage,
    ]
    opened = []
    real_open = mtkd.stages.open_checked_cache

    def spy(cfg, tasks, *train_ids):
        opened.append((Path(cfg.run.dir), Path(cfg.kd.cache_dir)))
        return real_open(cfg, tasks, *train_ids)

    monkeypatch.setattr(mtkd.stages, "open_checked_cache", spy)
    study, overrides = load_study("label_efficiency", args)
    results = run_study(study, overrides)
    printed = capsys.readouterr().out

    for name in ("results.md", "results.json", "study.png", "protocol.json"):
        assert (out / name).is_file(), name
    assert (out / "study.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
    assert "one teacher per fraction, trained on that fraction's labels only" in printed
    header = "| fraction | arm | dr_grade: kappa | dme_risk: kappa | glaucoma: kappa | cdr: mae |"
    assert header in printed
    for arm in ("KD", "no KD", "KD gain"):
        assert f"| 0.5 | {arm} |" in printed

    # The KD arm opened the fraction's cache, the no-KD arm no cache at all.
    cache = out / "cache_f0.5"
    assert sorted(opened) == [(out / "f0.5" / f"seed{s}" / "kd", cache) for s in (0, 1)]
    for seed in (0, 1):
        kd_cfg = (out / "f0.5" / f"seed{seed}" / "kd" / "checkpoints" / "config.yaml").read_text()
        nokd_cfg = (
            out / "f0.5" / f"seed{seed}" / "nokd" / "checkpoints" / "config.yaml"
        ).read_text()
        assert "mode: cached" in kd_cfg and f"cache_dir: {cache}" in kd_cfg
        assert "mode: none" in nokd_cfg
        assert f"seed: {seed}" in kd_cfg and "label_fraction: 0.5" in nokd_cfg
    teacher_cfg = (out / "teacher_f0.5" / "checkpoints" / "config.yaml").read_text()
    assert "label_fraction: 0.5" in teacher_cfg  # the honest protocol

    # The JSON: every cell, and the summary's numbers are the cells' own.
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(results))
    assert len(data["cells"]) == 4
    kd = [c["metrics"]["test/cdr/mae"] for c in data["cells"] if c["arm"] == "kd"]
    nokd = [c["metrics"]["test/cdr/mae"] for c in data["cells"] if c["arm"] == "nokd"]
    row = next(r for r in data["summary"]["cdr"]["rows"] if r["arm"] == "kd")
    assert row["n"] == 2 and row["mean"] == pytest.approx(sum(kd) / 2)
    gain = data["summary"]["cdr"]["gain"][0]
    assert gain["mean"] == pytest.approx(
        sum(n - k for k, n in zip(kd, nokd)) / 2
    )  # lower is better

    # Interrupted cells: one killed after training (evaluated only), one killed in training
    # (resumed from its last.ckpt; trained to the end already, so it trains no further).
    (out / "f0.5" / "seed0" / "kd" / "metrics_test.json").unlink()
    for name in ("metrics_test.json", "metrics_val.json"):
        (out / "f0.5" / "seed1" / "nokd" / name).unlink()
    caplog.clear()
    again = run_study(*load_study("label_efficiency", args))
    assert again["summary"] == results["summary"]
    last = out / "f0.5" / "seed1" / "nokd" / "checkpoints" / "last.ckpt"
    assert f"f0.5_s1_nokd: interrupted earlier, resuming from {last}" in caplog.text
    assert "f0.5_s0_kd: trained earlier, kept" in caplog.text
    assert "f0.5_s1_kd: finished earlier, kept" in caplog.text

    # Rerun: every cell, teacher and cache is finished, so nothing trains.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished study trained again")

    for name in ("fit", "cache_teacher", "evaluate"):
        monkeypatch.setattr(mtkd.commands.study_runs, name, no_training)
    caplog.clear()
    again = run_study(*load_study("label_efficiency", args))
    assert again["summary"] == results["summary"]
    assert "f0.5_s1_nokd: finished earlier, kept" in caplog.text

    with pytest.raises(ValueError, match="student_epochs differ.*study.out=DIR"):
        run_study(*load_study("label_efficiency", [*args, "study.student_epochs=2"]))


class Stop(Exception):
    """Raised where the study would start training."""


def stop(*args, **kwargs):
    raise Stop


@pytest.mark.unit
def test_a_config_folder_that_shadows_a_group_file_is_refused_naming_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """protocol.json holds the resolved stage configs, not the override strings: the same
    overrides with a kd/cached.yaml added to their config_dir folder are another protocol."""
    out, shadow = tmp_path / "study", tmp_path / "configs"
    shadow.mkdir()
    args = ["study.fractions=[0.5]", "study.seeds=[0]", f"study.out={out}", f"config_dir={shadow}"]
    monkeypatch.setattr(mtkd.commands.study_runs, "teacher_for", stop)
    with pytest.raises(Stop):
        run_study(*load_study("label_efficiency", args))
    configs = json.loads((out / "protocol.json").read_text())["configs"]
    assert sorted(configs) == ["student_kd", "student_nokd", "teacher"]
    assert (
        configs["student_kd"]["kd"]["alpha"] == 0.5
        and configs["student_nokd"]["kd"]["mode"] == "none"
    )
    # what differs per cell (or only names it) is left out
    assert "dir" not in configs["teacher"]["run"] and "seed" not in configs["student_kd"]["run"]
    assert "label_fraction" not in configs["teacher"]["data"] and "logger" not in configs["teacher"]

    (shadow / "kd").mkdir()
    (shadow / "kd" / "cached.yaml").write_text("mode: cached\nalpha: 0.9\n")
    with pytest.raises(ValueError) as refused:
        run_study(*load_study("label_efficiency", args))
    assert str(refused.value).startswith(
        f"{out} holds a study run with other settings (configs.student_kd.kd.alpha differ, see "
        f"{out / 'protocol.json'}); give it another folder with study.out=DIR"
    )
    (shadow / "kd" / "cached.yaml").unlink()
    with pytest.raises(Stop):  # the same configs again
        run_study(*load_study("label_efficiency", [*args, "study.seeds=[0,1]"]))


@pytest.mark.unit
def test_study_refuses_fast_dev_run_before_any_stage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="study: trainer.fast_dev_run writes no checkpoint"):
        run_study(
            *load_study("label_efficiency", [f"study.out={tmp_path}", "trainer.fast_dev_run=true"])
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_a_run_is_read_back_resumed_or_trained_from_what_it_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resumed: list[str | None] = []

    def fake_fit(cfg):
        resumed.append(cfg.run.resume)
        return Path(cfg.run.dir) / "checkpoints" / "best.ckpt"

    monkeypatch.setattr(mtkd.commands.study_runs, "fit", fake_fit)
    for left, expected in [
        (("last.ckpt", "best.ckpt"), "last.ckpt"),
        (("best.ckpt",), "best.ckpt"),
    ]:
        run_dir = tmp_path / expected.removesuffix(".ckpt")
        (run_dir / "checkpoints").mkdir(parents=True)
        for name in left:
            (run_dir / "checkpoints" / name).write_bytes(b"")
        trained("cell", "distill", ["kd=none", f"run.dir={run_dir}"])
        assert resumed.pop() == str(run_dir / "checkpoints" / expected)
    assert trained("cell", "distill", ["kd=none", f"run.dir={tmp_path / 'new'}"])
    assert resumed.pop() is None
    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics_val.json").write_text(json.dumps({"checkpoint": "elsewhere/best.ckpt"}))
    assert trained("cell", "distill", ["kd=none", f"run.dir={done}"]) == Path("elsewhere/best.ckpt")
    assert resumed == []
