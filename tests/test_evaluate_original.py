"""Evaluation the way challenges score it: segmentation mapped back onto the original pixel grid
and scored inside the field of view (Dice, IoU, AUPR, AUROC against hand-computed values), joint
accuracy over classification tasks, and ``evaluate resolution=original`` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from data_modules.datamodule import FundusDataModule, FundusDataset
from data_modules.preprocess import Preprocessor, crop_resize, uncrop
from data_modules.samples import Sample
from mtkd.cli import main
from mtkd.evaluation import (
    BinnedAUROC,
    BinnedAveragePrecision,
    MaskScores,
    joint_groups,
    score_original,
)
from mtkd.run_config import load_config
from mtkd.stages import evaluate, fit
from mtkd.tasks import build_tasks


@pytest.mark.unit
def test_uncrop_inverts_crop_resize_on_a_ramp():
    """Pixel centres map onto pixel centres: a linear ramp survives crop, 2x downscale and
    uncrop exactly inside the box (bilinear reproduces linear functions)."""
    yy, xx = np.mgrid[0:80, 0:100].astype(np.float32)
    ramp = 2 * xx + yy
    box = (10, 0, 80, 80)
    small = crop_resize(ramp, box, 40, Image.BILINEAR)
    back = uncrop(small[None], box, 100, 80)[0]
    assert back.shape == (80, 100)
    np.testing.assert_allclose(back[4:-4, 14:-14], ramp[4:-4, 14:-14], atol=1e-3)


@pytest.mark.unit
def test_binned_curves_fill_the_state_torchmetrics_fills():
    torch.manual_seed(0)
    preds = torch.rand(20_000)
    preds[:6] = torch.tensor([0.0, 1.0, 0.5, 1 / 199, 2 / 199, 198 / 199])  # on bin edges
    target = (torch.rand(20_000) < preds).long()
    for ours, theirs in (
        (BinnedAveragePrecision(thresholds=200), BinaryAveragePrecision(thresholds=200)),
        (BinnedAUROC(thresholds=7), BinaryAUROC(thresholds=7)),
    ):
        for part in (slice(0, 15_000), slice(15_000, None)):
            ours.update(preds[part], target[part])
            theirs.update(preds[part], target[part])
        assert torch.equal(ours.confmat, theirs.confmat)
        assert float(ours.compute()) == pytest.approx(float(theirs.compute()))


def _png(path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _hand_made_sample(tmp_path, with_fov_mask: bool) -> Sample:
    """A 10 x 8 photograph, bright in columns 1-8, so its crop box is (1, 0, 8, 8). Class ``a``
    has three foreground pixels, one of them (x=0) outside the field of view; class ``b`` ships
    no mask (empty). The optional FOV mask also leaves out the pixel (x=4, y=0)."""
    image = np.zeros((8, 10, 3), np.uint8)
    image[:, 1:9] = 150
    lesion = np.zeros((8, 10), np.uint8)
    for x, y in ((2, 2), (3, 3), (5, 5), (0, 4)):
        lesion[y, x] = 255
    masks = {"a": _png(tmp_path / "a.png", lesion)}
    if with_fov_mask:
        fov = np.zeros((8, 10), np.uint8)
        fov[:, 1:9] = 255
        fov[0, 4] = 0
        masks["fov"] = _png(tmp_path / "fov.png", fov)
    return Sample("s/test/0", "p0", _png(tmp_path / "image.png", image), "test", masks=masks)


def _hand_made_probabilities() -> np.ndarray:
    """2 x 8 x 8 at the working resolution (= box side, so map pixel (u, v) is original pixel
    (u + 1, v)). Class a: foreground scored 0.9, 0.8, 0.3; a false positive 0.6 at (6, 6) and a
    brighter one, 0.95, at (4, 0), the pixel the FOV mask leaves out. Class b: 0.2 everywhere."""
    prob = np.zeros((2, 8, 8), np.float32)
    for (x, y), p in {(2, 2): 0.9, (3, 3): 0.8, (5, 5): 0.3, (6, 6): 0.6, (4, 0): 0.95}.items():
        prob[0, y, x - 1] = p
    prob[1] = 0.2
    return prob


@pytest.mark.unit
@pytest.mark.parametrize(
    ("with_fov_mask", "expected_a"),
    [
        # 63 FOV pixels; ranked 0.9+ 0.8+ 0.6- 0.3+ then 59 zeros. Dice at 0.5: tp 2, fp 1, fn 1.
        # AP = (1 + 1 + 3/4) / 3; AUROC = (60 + 60 + 59) / (3 * 60).
        (True, {"dice": 4 / 6, "iou": 2 / 4, "aupr": 11 / 12, "auroc": 179 / 180}),
        # The bright rule keeps (4, 0): 0.95- ranks first. Dice: tp 2, fp 2, fn 1.
        # AP = (1/2 + 2/3 + 3/5) / 3; AUROC = (60 + 60 + 59) / (3 * 61).
        (False, {"dice": 4 / 7, "iou": 2 / 5, "aupr": 53 / 90, "auroc": 179 / 183}),
    ],
)
def test_original_resolution_scores_inside_the_field_of_view(tmp_path, with_fov_mask, expected_a):
    sample = _hand_made_sample(tmp_path, with_fov_mask)
    box = Preprocessor(8, cache_dir=None)(sample, ["a"]).box
    assert box == (1, 0, 8, 8)
    scores = MaskScores(["a", "b"])
    score_original(scores, _hand_made_probabilities(), sample, box)
    got = scores.compute()
    for key, value in expected_a.items():
        assert got[f"{key}_a"] == pytest.approx(value, abs=1e-4), key
    # b has no foreground: Dice and IoU 0, no curve; the means skip what is undefined.
    assert got["dice_b"] == 0 and got["iou_b"] == 0
    assert math.isnan(got["aupr_b"]) and math.isnan(got["auroc_b"])
    assert got["dice"] == pytest.approx(expected_a["dice"] / 2, abs=1e-4)
    assert got["aupr"] == pytest.approx(expected_a["aupr"], abs=1e-4)


@pytest.mark.unit
def test_working_resolution_truth_maps_back_onto_the_original_masks(synth_root):
    """The preprocessed (64 px) optic-disc masks of synthetic photographs, scored as predictions
    at the original 128 px, nearly match the original masks; the same maps put 3 px off do not."""
    from data_modules.synthetic import synthetic_source

    samples = synthetic_source(synth_root, n=48, image_size=128, seed=0)[:6]
    preprocessor = Preprocessor(64, cache_dir=None)
    dice = {}
    for shift in (0, 3):
        scores = MaskScores(["optic_disc"])
        for sample in samples:
            prep = preprocessor(sample, ["optic_disc"])
            x0, y0, w, h = prep.box
            prob = prep.masks["optic_disc"][None].astype(np.float32)
            score_original(scores, prob, sample, (x0 + shift, y0, w, h))
        dice[shift] = scores.compute()["dice"]
    assert dice[0] > 0.93 and dice[3] < 0.85, dice


@pytest.mark.unit
def test_a_resample_at_the_original_resolution_pools_its_drawn_images_as_compute_does():
    """Each resample's scores equal a fresh MaskScores fed the drawn images (an image drawn
    twice counts twice); draws index the images in sample-id order, whatever order they were
    scored in, and a class without foreground in a resample has no curve."""
    generator = torch.Generator().manual_seed(0)

    def plane(foreground: float) -> tuple[torch.Tensor, torch.Tensor]:
        prob = torch.rand(500, generator=generator)
        return prob, (torch.rand(500, generator=generator) < foreground * prob).long()

    images = {"b": [plane(0.6), plane(0.5)], "a": [plane(0.6), plane(0.4)]}
    images["c"] = [plane(0.6), plane(0.0)]  # no foreground of class y
    scores = MaskScores(["x", "y"])
    for sample_id, planes in images.items():
        scores.add_image(sample_id, planes)
    draws = torch.tensor([[0, 1, 2], [0, 0, 2], [2, 2, 2]])  # a b c, a a c, c c c
    got = scores.resampled_metrics(draws)
    for row, drawn in enumerate(draws.tolist()):
        expected = MaskScores(["x", "y"])
        for index in drawn:
            expected.add_image("abc"[index], images["abc"[index]])
        for key, value in expected.compute().items():
            assert got[key][row].item() == pytest.approx(value, nan_ok=True), (row, key)
    assert math.isnan(got["aupr_y"][2]) and not math.isnan(got["aupr_y"][1])
    assert got["dice"][0].item() == pytest.approx(scores.compute()["dice"])


@pytest.mark.unit
def test_scores_merged_from_two_ranks_equal_one_process_scoring_every_image():
    """Under DDP each rank scores its share of the split and rank 0 merges them (``merge``):
    pooled values and resamples are those of one process that saw every image."""
    generator = torch.Generator().manual_seed(1)
    images = {
        sid: [(torch.rand(300, generator=generator), torch.rand(300, generator=generator) < 0.3)]
        for sid in "dacb"
    }
    whole, first, second = MaskScores(["x"]), MaskScores(["x"]), MaskScores(["x"])
    for index, (sid, planes) in enumerate(images.items()):
        whole.add_image(sid, [(p, t.long()) for p, t in planes])
        (first if index % 2 else second).add_image(sid, [(p, t.long()) for p, t in planes])
    first.merge(second)
    assert first.images == 4 and first.positives == whole.positives
    assert first.compute() == pytest.approx(whole.compute())
    draws = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 1]])
    merged, expected = first.resampled_metrics(draws), whole.resampled_metrics(draws)
    for key, values in expected.items():
        assert torch.allclose(merged[key], values), key


@pytest.mark.unit
def test_a_sample_without_any_class_mask_is_not_scored(tmp_path):
    sample = Sample("s/test/1", "p1", _png(tmp_path / "i.png", np.full((8, 10, 3), 99, np.uint8)))
    scores = MaskScores(["a"])
    score_original(scores, np.ones((1, 8, 8), np.float32), sample, (1, 0, 8, 8))
    assert scores.images == 0 and scores.positives == [0]


@pytest.mark.unit
def test_joint_groups_default_explicit_and_errors():
    both = {"kind": "classification", "num_classes": 3}
    tasks = build_tasks({"dr_grade": both, "dme_risk": both, "cdr": {"kind": "regression"}})
    assert joint_groups(tasks, None) == [("dr_grade", "dme_risk")]
    assert joint_groups({"dr_grade": tasks["dr_grade"]}, None) == []
    assert joint_groups(tasks, ["none"]) == []
    assert joint_groups(tasks, ["dme_risk,dr_grade"]) == [("dme_risk", "dr_grade")]
    for bad in ("dr_grade,cdr", "dr_grade", "dr_grade,dr_grade", "dr_grade,nope"):
        with pytest.raises(ValueError, match=f"joint={bad}: name two or more .*dr_grade, dme_risk"):
            joint_groups(tasks, [bad])


@pytest.mark.unit
def test_cli_refuses_an_unknown_resolution_before_reading_the_checkpoint(capsys):
    assert main(["evaluate", "ckpt=missing.ckpt", "resolution=full"]) == 2
    assert "resolution='full': evaluate takes resolution=working" in capsys.readouterr().err


@pytest.mark.integration
def test_evaluate_original_resolution_end_to_end(tiny, capsys, monkeypatch):
    cfg = load_config(
        "teacher", tiny(**{"trainer.limit_train_batches": 1, "trainer.limit_val_batches": 1})
    )
    best = fit(cfg)
    run_dir = best.parent.parent
    capsys.readouterr()
    assert main(["evaluate", f"ckpt={best}", "joint=dr_grade,cdr"]) == 2  # before any test pass
    assert "joint=dr_grade,cdr: name two or more" in capsys.readouterr().err
    loaded: list[str] = []  # the test images read, one per item: one pass over the split
    item = FundusDataset.__getitem__
    monkeypatch.setattr(
        FundusDataset,
        "__getitem__",
        lambda self, i: loaded.append(self.samples[i].sample_id) or item(self, i),
    )
    metrics = evaluate(str(best), "test", [], resolution="original", bootstrap=200)
    test_ids = [s.sample_id for s in FundusDataModule(cfg.data, {}).split("test")]
    assert sorted(loaded) == sorted(test_ids)  # original pixels, joint, intervals: 1 pass, not 3
    assert "on test, original resolution" in capsys.readouterr().out
    payload = json.loads((run_dir / "metrics_test_original.json").read_text())
    assert payload["metrics"] == pytest.approx(metrics, nan_ok=True)
    # The rescored tasks keep intervals, at the original resolution (AUPR and AUROC exist there
    # only); they used to be dropped, leaving "ci": {} beside "resamples".
    ci = payload["ci"]
    for task in ("lesions", "anatomy"):
        for metric in ("dice", "iou", "aupr", "auroc"):
            assert f"test/{task}/{metric}" in ci, (task, metric)
    lo, hi = ci["test/anatomy/auroc_vessels"]
    assert 0 <= lo <= hi <= 1
    assert not (run_dir / "metrics_test.json").exists()  # the working-resolution file is another
    dense = ("test/lesions/", "test/anatomy/")
    for task, classes in (
        ("lesions", ["microaneurysms", "haemorrhages", "hard_exudates"]),
        ("anatomy", ["vessels", "optic_disc", "optic_cup"]),
    ):
        for metric in ("dice", "iou", "aupr", "auroc"):
            # The plain name is the mean over the classes that have a value.
            per_class = [metrics[f"test/{task}/{metric}_{c}"] for c in classes]
            scored = [v for v in per_class if not math.isnan(v)]
            assert metrics[f"test/{task}/{metric}"] == pytest.approx(sum(scored) / len(scored))
    assert not math.isnan(metrics["test/anatomy/auroc_vessels"])  # every image shows vessels
    joint = metrics["test/dr_grade+dme_risk/joint_acc"]
    assert joint <= min(metrics["test/dr_grade/acc"], metrics["test/dme_risk/acc"])
    # Only the dense tasks are rescored: every other metric is the working-resolution one.
    working = evaluate(str(best), "test", [])
    others = {k: v for k, v in working.items() if not k.startswith(dense) and k != "test/loss"}
    assert {k: metrics[k] for k in others} == pytest.approx(others, nan_ok=True)
    assert "test/landmarks/dist_px" in others
