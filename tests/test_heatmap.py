"""The heatmap localisation head: soft-argmax, Gaussian targets that move with the image, KD from
the teacher's cached points, and a network that builds its decoder for it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mtkd.models.multitask import MultiTaskNet
from mtkd.tasks import build_tasks
from mtkd.tasks.localization import gaussian_factors, soft_argmax

POINTS = {"kind": "localization", "points": ["optic_disc", "fovea"], "head": "heatmap"}


@pytest.mark.unit
def test_soft_argmax_of_hand_made_heatmaps():
    logits = torch.full((1, 2, 4, 8), -1e4)
    logits[0, 0, 1, 3] = 0.0  # one peak: row 1, column 3
    logits[0, 1, 0, 0] = logits[0, 1, 2, 6] = 0.0  # two equal peaks: their midpoint
    points = soft_argmax(logits)[0]
    assert points[0].tolist() == pytest.approx([3.5 / 8, 1.5 / 4])
    assert points[1].tolist() == pytest.approx([(0.5 + 6.5) / 2 / 8, (0.5 + 2.5) / 2 / 4])
    flat = soft_argmax(torch.zeros(1, 1, 5, 5))[0, 0]
    assert flat.tolist() == pytest.approx([0.5, 0.5])


@pytest.mark.unit
def test_gaussian_targets_move_with_a_horizontal_flip():
    def gaussian(point: torch.Tensor) -> torch.Tensor:
        """The 2-D Gaussian the heatmap loss fits: the outer product of its two factors."""
        gx, gy = gaussian_factors(point, 16, 16, 0.05)
        return gy[0, 0, :, None] * gx[0, 0, None, :]

    point = torch.tensor([[[0.2, 0.7]]])
    flipped = torch.tensor([[[0.8, 0.7]]])
    target, moved = gaussian(point), gaussian(flipped)
    assert torch.allclose(moved, target.flip(1))
    assert target.sum().item() == pytest.approx(1.0)
    row, col = divmod(int(target.argmax()), 16)
    assert (col, row) == (3, 11)  # pixel centres (3.5/16, 11.5/16) are nearest (0.2, 0.7)


@pytest.mark.unit
def test_flip_moves_the_heatmap_target_through_the_dataset(tmp_path):
    """The dataset's keypoints follow the flip, so the Gaussian target does too."""
    import numpy as np

    from data_modules.datamodule import FundusDataset
    from data_modules.preprocess import Prepared
    from data_modules.samples import Sample
    from data_modules.transforms import build_transform

    tasks = build_tasks({"landmarks": POINTS})

    class Fixed:
        size = 32

        def __call__(self, sample, masks):
            image = np.zeros((32, 32, 3), np.uint8)
            return Prepared(
                image,
                {},
                {"optic_disc": (0.25, 0.5), "fovea": (0.6, 0.4)},
                (32.0, 32.0),
                (0, 0, 32, 32),
            )

    sample = Sample(sample_id="s", image="unused", patient_id="p", split="train")
    flip = build_transform([{"name": "HorizontalFlip", "p": 1.0}], [0.5] * 3, [0.5] * 3)
    item = FundusDataset([sample], tasks, Fixed(), flip)[0]
    moved = item["targets"]["landmarks"]
    assert torch.allclose(moved, torch.tensor([[0.75, 0.5], [0.4, 0.4]]), atol=1e-5), moved


@pytest.mark.unit
def test_kd_from_cached_points_pulls_the_heatmap_to_the_teacher():
    task = build_tasks({"landmarks": POINTS})["landmarks"]
    teacher = torch.tensor([[[0.3, 0.6], [0.7, 0.2]]])
    logits = torch.zeros(1, 2, 24, 24, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.5)
    start = task.kd_loss(logits, teacher, 1.0).item()
    for _ in range(60):
        opt.zero_grad()
        task.kd_loss(logits, teacher, 1.0).sum().backward()
        opt.step()
    assert task.kd_loss(logits, teacher, 1.0).item() < 0.2 * start
    assert torch.allclose(task.teacher_output(logits.detach()), teacher, atol=0.02)


@pytest.mark.unit
def test_network_builds_a_decoder_for_heatmaps_and_outputs_points_when_activated():
    tasks = build_tasks(
        {"landmarks": POINTS, "grade": {"kind": "classification", "num_classes": 5}}
    )
    cfg = OmegaConf.create(
        {
            "encoder": "resnet18",
            "encoder_weights": None,
            "encoder_depth": 5,
            "decoder_channels": [32, 16, 16, 8, 8],
            "head_dropout": 0.0,
        }
    )
    net = MultiTaskNet(tasks, cfg).eval()
    assert net.decoder is not None
    out = net(torch.randn(2, 3, 64, 64))
    assert out["landmarks"].shape == (2, 2, 64, 64) and out["grade"].shape == (2, 5)
    points = tasks["landmarks"].activate(out["landmarks"])
    assert points.shape == (2, 2, 2) and bool(((points > 0) & (points < 1)).all())
    pooled = build_tasks({"grade": {"kind": "classification", "num_classes": 5}})
    assert MultiTaskNet(pooled, cfg).decoder is None


@pytest.mark.unit
def test_per_point_distance_in_original_pixels():
    task = build_tasks({"landmarks": {**POINTS, "head": "pooled"}})["landmarks"]
    metrics = task.metrics()
    pred = torch.tensor([[[0.5, 0.5], [0.1, 0.1]]])
    true = torch.tensor([[[0.5, 0.6], [0.1, 0.4]]])
    task.update_metrics(metrics, pred, true, {"pixel_scale": torch.tensor([[100.0, 200.0]])})
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values["dist_px_optic_disc"] == pytest.approx(20.0)
    assert values["dist_px_fovea"] == pytest.approx(60.0)
    assert values["dist_px"] == pytest.approx(40.0)


@pytest.mark.integration
def test_heatmap_teacher_learns_points_on_one_batch(tiny):
    from data_modules.datamodule import FundusDataModule
    from mtkd.config import to_container
    from mtkd.modules.teacher import TeacherModule
    from mtkd.run_config import load_config

    cfg = load_config("teacher", tiny(**{"tasks.landmarks.head": "heatmap"}))
    torch.manual_seed(0)
    module = TeacherModule(to_container(cfg))
    task = module.tasks["landmarks"]
    batch = next(iter(FundusDataModule(cfg.data, module.tasks).train_dataloader()))
    has = batch["has"]["landmarks"]
    target = batch["targets"]["landmarks"][has]
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)

    def error() -> float:
        points = task.activate(module(batch["image"])["landmarks"])[has]
        return float((points - target).norm(dim=-1).mean())

    start = error()
    for _ in range(25):
        opt.zero_grad()
        losses = module.supervised_losses(module(batch["image"]), batch)
        losses["landmarks"].backward()
        opt.step()
    assert error() < 0.5 * start, (start, error())


@pytest.mark.integration
def test_pretrained_heatmap_checkpoint_exports_and_predicts_points(tiny, tmp_path, synth_root):
    """A packaged-weights teacher with a heatmap head: export writes points (not heatmaps) and
    the encoder's normalisation; ONNX matches torch; predict gives points in image pixels."""
    import json

    import onnxruntime as ort

    from mtkd.commands.exporting import export
    from mtkd.commands.prediction import predict
    from mtkd.modules.checkpoint import load_net
    from mtkd.run_config import load_config
    from mtkd.stages import fit

    overrides = tiny(
        **{
            "tasks.landmarks.head": "heatmap",
            "model.encoder": "tu-tf_efficientnet_lite0",
            "model.encoder_weights": "packaged",
        }
    )
    best = fit(load_config("teacher", overrides))
    out = export(best, tmp_path / "export")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["input"]["mean"] == [0.5, 0.5, 0.5] and meta["input"]["std"] == [0.5, 0.5, 0.5]
    assert meta["tasks"]["landmarks"]["shape"] == ["batch", 2, 2]
    net, tasks, _ = load_net(best)
    image = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = tasks["landmarks"].activate(net(image)["landmarks"])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(meta["outputs"], session.run(None, {"image": image.numpy()})))
    assert torch.allclose(torch.from_numpy(got["landmarks"]), expected, atol=1e-4)
    photo = sorted((synth_root / "images").iterdir())[0]
    result = predict(best, photo, tmp_path / "pred")["predictions"][0]["tasks"]["landmarks"]
    assert set(result["points"]) == {"optic_disc", "fovea"}
    assert all(0 <= p["x"] <= 128 and 0 <= p["y"] <= 128 for p in result["points"].values())
