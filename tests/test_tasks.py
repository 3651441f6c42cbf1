"""Each task kind's loss, KD loss and metrics on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkd.kd.storage import CacheStorage
from mtkd.modules.common import fp32
from mtkd.tasks import Annotation, build_tasks, masked_mean

pytestmark = pytest.mark.unit


def make(kind: str, **spec):
    return build_tasks({"t": {"kind": kind, **spec}})["t"]


def test_classification_ce_and_kd_with_temperature():
    task = make("classification", num_classes=3)
    pred = torch.tensor([[2.0, 0.0, 0.0]])
    expected_ce = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert task.loss(pred, torch.tensor([0])).item() == pytest.approx(expected_ce, rel=1e-6)
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    temperature = 2.0
    p_t = torch.softmax(teacher / temperature, 1)[0]
    p_s = torch.softmax(pred / temperature, 1)[0]
    kl = float((p_t * (p_t / p_s).log()).sum()) * temperature**2
    assert task.kd_loss(pred, teacher, temperature).item() == pytest.approx(kl, rel=1e-6)
    assert task.kd_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_gradient_is_temperature_times_the_probability_gap():
    """Hinton et al.: d(T^2 KL(p_t || p_s)) / dz_s = T (p_s - p_t), with p = softmax(z / T); the
    T^2 factor keeps the gradient's scale as T grows."""
    task = make("classification", num_classes=3)
    student = torch.tensor([[1.0, -0.5, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 3.0, -1.0]])
    temperature = 4.0
    task.kd_loss(student, teacher, temperature).sum().backward()
    gap = torch.softmax(student.detach() / temperature, 1) - torch.softmax(teacher / temperature, 1)
    assert torch.allclose(student.grad, temperature * gap, atol=1e-6)


def test_combined_extreme_teachers_stay_finite_through_the_fp16_cache():
    """A probability that underflows (softmax of a 400-logit gap) must not become -inf in the
    cache: log(mean(softmax)) did, and the KD loss's 0 * -inf was NaN."""
    task = make("classification", num_classes=3)
    teachers = [torch.tensor([[200.0, 0.0, -200.0]]), torch.tensor([[0.0, 200.0, -200.0]])]
    combined = task.combine_teachers([t.half().float() for t in teachers])
    assert combined[0].tolist() == pytest.approx([-math.log(2), -math.log(2), -400.0])
    storage = CacheStorage(dense_size=32, logits_dtype="float16")
    cached = torch.from_numpy(task.decode_cache(task.encode_cache(combined, storage)[0]))[None]
    loss = task.kd_loss(torch.zeros(1, 3), cached, 4.0)
    assert torch.isfinite(loss).all()
    # Where nothing underflows it is still the log of the mean probability.
    moderate = [torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.5]])]
    mean = torch.stack([t.softmax(dim=1) for t in moderate]).mean(dim=0)
    assert torch.allclose(task.combine_teachers(moderate), mean.log(), atol=1e-6)


def test_multilabel_kd_is_soft_bce_times_t_squared():
    task = make("multilabel", classes=["x", "y"])
    pred, teacher, temperature = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, -1.0]]), 2.0
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    bce = [
        -(sigmoid(t / temperature) * math.log(sigmoid(s / temperature)))
        - (1 - sigmoid(t / temperature)) * math.log(1 - sigmoid(s / temperature))
        for s, t in ((0.0, 1.0), (2.0, -1.0))
    ]
    expected = (bce[0] + bce[1]) / 2 * temperature**2
    assert task.kd_loss(pred, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_regression_kd_follows_the_spec_loss_unless_kd_tasks_picks_one():
    pred, teacher = torch.tensor([[0.5, 1.0]]), torch.tensor([[0.2, 1.4]])
    spec = {"kind": "regression", "labels": ["a", "b"]}
    mse = build_tasks({"t": spec})["t"]
    l1 = build_tasks({"t": {**spec, "loss": "l1"}})["t"]
    picked = build_tasks({"t": spec}, {"t": {"loss": "l1"}})["t"]
    for temperature in (1.0, 4.0):  # a regression has nothing to soften
        assert mse.kd_loss(pred, teacher, temperature).item() == pytest.approx(0.125)
        assert l1.kd_loss(pred, teacher, temperature).item() == pytest.approx(0.35)
        assert picked.kd_loss(pred, teacher, temperature).item() == pytest.approx(0.35)
    assert mse.loss(pred, teacher).item() == pytest.approx(0.125)  # spec.loss left alone


def test_kd_loss_registry_errors_name_the_valid_losses():
    with pytest.raises(ValueError, match=r"kd.tasks.t.loss='mse' is unknown; choose one of: .*kl"):
        build_tasks({"t": {"kind": "classification"}}, {"t": {"loss": "mse"}})
    with pytest.raises(ValueError, match=r"unknown keys \['alpah'\]; valid keys"):
        build_tasks({"t": {"kind": "classification"}}, {"t": {"alpah": 0.5}})


def test_ordinal_penalises_distant_grades_more():
    task = make("classification", num_classes=5, ordinal=True)
    plain = make("classification", num_classes=5)
    pred = torch.tensor([[5.0, 0, 0, 0, 0]])
    near, far = torch.tensor([1]), torch.tensor([4])
    # Plain CE is the same for both wrong grades; the ordinal term separates them.
    assert plain.loss(pred, near).item() == pytest.approx(plain.loss(pred, far).item())
    assert task.loss(pred, far).item() > task.loss(pred, near).item() + 0.5


def test_classification_metrics_known_values():
    task = make("classification", num_classes=3)
    metrics = task.metrics()
    logits = torch.eye(3)[[0, 1, 2, 2]] * 5
    target = torch.tensor([0, 1, 2, 1])
    task.update_metrics(metrics, logits, target, {})
    values = metrics.compute()
    assert values["acc"].item() == pytest.approx(0.75)
    assert values["balanced_acc"].item() == pytest.approx((1 + 0.5 + 1) / 3)
    # Quadratic weighted kappa is 1 for a perfect prediction.
    perfect = task.metrics()
    task.update_metrics(perfect, torch.eye(3)[target] * 5, target, {})
    assert perfect.compute()["kappa"].item() == pytest.approx(1.0)


def test_masked_mean_ignores_unlabeled_and_is_zero_without_labels():
    values = torch.tensor([1.0, 3.0, 100.0], requires_grad=True)
    assert masked_mean(values, torch.tensor([True, True, False])).item() == pytest.approx(2.0)
    none = masked_mean(values, torch.tensor([False, False, False]))
    assert none.item() == 0.0 and not torch.isnan(none)
    none.backward()
    assert torch.all(values.grad == 0)


def test_segmentation_target_absent_class_is_empty_and_no_mask_is_unlabeled():
    task = make("segmentation", classes=["a", "b"])
    mask = np.ones((4, 4), np.float32)
    target = task.target(Annotation(labels={}, masks={"a": mask}, points={}, size=4))
    assert target.shape == (2, 4, 4)
    assert target[0].sum() == 16 and target[1].sum() == 0
    assert task.target(Annotation(labels={}, masks={}, points={}, size=4)) is None


def test_segmentation_loss_and_kd_known_values():
    task = make("segmentation", classes=["a"], dice_weight=0.0)
    pred = torch.zeros(1, 1, 2, 2)
    target = torch.ones(1, 1, 2, 2)
    assert task.loss(pred, target).item() == pytest.approx(math.log(2), rel=1e-6)
    weighted = make("segmentation", classes=["a"], dice_weight=0.0, pos_weight=[3.0])
    target[..., 0, :] = 0  # half the pixels foreground: mean of 3 ln 2 and ln 2
    assert weighted.loss(pred, target).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    # Binary KL(p || sigmoid(0)) with p = 0.8 at every pixel.
    p = 0.8
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    teacher = torch.full((1, 1, 4, 4), p)  # larger map: resized to the student's size
    assert task.kd_loss(pred, teacher, 1.0).item() == pytest.approx(kl, rel=1e-4)
    assert task.kd_loss(torch.logit(teacher[..., :2, :2]), teacher, 1.0).item() == pytest.approx(
        0, abs=1e-5
    )


def test_segmentation_kd_adds_dice_with_the_teacher_map_as_soft_label():
    task = make("segmentation", classes=["a"])
    teacher = torch.tensor([0.8, 0.8, 0.2, 0.2]).view(1, 1, 2, 2)
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)  # the same at 0.8 and 0.2
    # Dice of p = 0.5 against the soft map: (2 * 0.5 * 2 + 1) / (2 + 2 + 1) = 0.6.
    got = task.kd_loss(torch.zeros(1, 1, 2, 2), teacher, 1.0).item()
    assert got == pytest.approx(kl + 0.4, rel=1e-5)


def test_segmentation_dice_counts_only_the_classes_a_sample_shows():
    task = make("segmentation", classes=["a", "b"])
    pred = torch.zeros(2, 2, 2, 2)  # p = 0.5 everywhere: BCE = ln 2 per pixel
    target = torch.zeros(2, 2, 2, 2)
    target[0, 0, 0] = 1  # sample 0 shows class a on 2 of 4 pixels and no class b
    loss = task.loss(pred, target)
    # Class a: Dice = (2 * 0.5 * 2 + 1) / (0.5 * 4 + 2 + 1) = 0.6; the empty b is not counted.
    assert loss[0].item() == pytest.approx(math.log(2) + 0.4, rel=1e-6)
    # An empty sample keeps only BCE: soft Dice would reward predicting nothing at all there.
    assert loss[1].item() == pytest.approx(math.log(2), rel=1e-6)


def test_segmentation_cache_uint8_round_trip():
    task = make("segmentation", classes=["a", "b"])
    probs = torch.rand(3, 2, 16, 16)
    storage = CacheStorage(dense_size=8, dense_dtype="uint8")
    rows = task.encode_cache(probs, storage)
    assert rows.dtype == np.uint8 and rows.shape == (3, 2, 8, 8)
    pooled = torch.nn.functional.avg_pool2d(probs, 2).numpy()
    assert np.abs(task.decode_cache(rows[0]) - pooled[0]).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("classes", [["a"], ["a", "b"]])
def test_segmentation_metrics_dice_iou(classes):
    task = make("segmentation", classes=classes)
    metrics = task.metrics()
    target = torch.tensor([[[[1, 1], [0, 0]]]]).repeat(1, len(classes), 1, 1)
    pred_logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]]]).repeat(1, len(classes), 1, 1)
    # per class: 1 TP, 1 FP, 1 FN
    task.update_metrics(metrics, pred_logits, target.float(), {})
    values = metrics.compute()
    assert values["dice"].item() == pytest.approx(0.5)
    assert values["iou"].item() == pytest.approx(1 / 3)
    assert values["dice_a"].item() == pytest.approx(0.5)


def test_localization_loss_and_pixel_distance():
    task = make("localization", points=["od", "fovea"])
    pred = torch.tensor([[[0.5, 0.5], [0.2, 0.2]]])
    target = torch.tensor([[[0.5, 0.8], [0.2, 0.2]]])
    assert task.loss(pred, target).item() == pytest.approx(0.3 / 4)
    assert task.kd_loss(pred, target, 1.0).item() == pytest.approx(0.09 / 4)
    metrics = task.metrics()
    task.update_metrics(metrics, pred, target, {"pixel_scale": torch.tensor([[1000.0, 2000.0]])})
    values = metrics.compute()
    assert values["dist"].item() == pytest.approx(0.15)
    assert values["dist_px"].item() == pytest.approx(0.3 * 2000 / 2)


def test_regression_and_multilabel():
    reg = make("regression")
    assert reg.loss(torch.tensor([[1.0]]), torch.tensor([[3.0]])).item() == pytest.approx(4.0)
    m = reg.metrics()
    reg.update_metrics(
        m, torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [2.0], [4.0]]), {}
    )
    values = m.compute()
    assert values["mae"].item() == pytest.approx(1 / 3)
    assert values["rmse"].item() == pytest.approx(math.sqrt(1 / 3))
    ml = make("multilabel", classes=["x", "y"])
    pred = torch.zeros(1, 2)
    assert ml.loss(pred, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(2))
    assert ml.target(Annotation(labels={}, masks={}, points={}, size=4)) is None
    with pytest.raises(ValueError, match="not"):
        ml.target(Annotation(labels={"x": 1.0}, masks={}, points={}, size=4))


def test_a_bounded_regression_head_starts_mid_range_and_stays_in_it():
    reg = make("regression", bounds=[0.0, 1.0])
    head = reg.build_head(4)
    with torch.no_grad():
        head[1].weight.zero_()
        head[1].bias.zero_()
        assert head(torch.randn(3, 4)).flatten().tolist() == [0.5, 0.5, 0.5]
        head[1].weight.fill_(100.0)
        out = head(torch.tensor([[1.0] * 4, [-1.0] * 4]))
    assert out.flatten().tolist() == [1.0, 0.0]
    assert "1.weight" in dict(head.named_parameters())  # unbounded checkpoints' names
    for bad in ([1.0, 0.0], [0.0]):
        with pytest.raises(ValueError, match=r"give \[low, high\] with low < high"):
            make("regression", bounds=bad)


def test_losses_stay_fp32_under_bf16_autocast():
    task = make("classification", num_classes=3)
    pred = torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(pred, torch.eye(3))
        assert logits.dtype == torch.bfloat16
        loss = fp32(lambda s, t: task.kd_loss(s, t, 4.0), logits, pred)
    assert loss.dtype == torch.float32
    expected = task.kd_loss(logits.float(), pred, 4.0)
    assert torch.allclose(loss, expected)


def test_unknown_kind_and_key_errors_list_valid_options():
    with pytest.raises(ValueError, match="kind='nope' is unknown; choose one of: .*classification"):
        build_tasks({"t": {"kind": "nope"}})
    with pytest.raises(ValueError, match="valid keys"):
        build_tasks({"t": {"kind": "segmentation", "classes": ["a"], "colour": 1}})
    with pytest.raises(ValueError, match="needs a list of classes"):
        build_tasks({"t": {"kind": "segmentation"}})
    with pytest.raises(ValueError, match="one positive number per class"):
        build_tasks({"t": {"kind": "segmentation", "classes": ["a", "b"], "pos_weight": [2.0]}})


def test_head_dropout_acts_on_the_global_tasks_input_in_training_only():
    from mtkd.models.multitask import MultiTaskNet
    from mtkd.run_config import load_config

    cfg = load_config("distill", ["model.head_dropout=0.5"]).model
    tasks = build_tasks({"grade": {"kind": "classification", "num_classes": 3}})
    net = MultiTaskNet(tasks, cfg)
    image = torch.randn(2, 3, 64, 64)
    net.train()
    torch.manual_seed(0)
    first = net(image)["grade"]
    assert not torch.equal(first, net(image)["grade"])  # a new mask per forward
    net.eval()
    assert torch.equal(net(image)["grade"], net(image)["grade"])


def test_a_kind_with_an_unknown_activation_is_refused_at_registration():
    from mtkd.tasks import Task, register_task

    class Softplus(Task):
        activation = "softplus"

    with pytest.raises(ValueError, match=r"activation='softplus' is not one of \['none', "):
        register_task("softplus_kind")(Softplus)


def test_regression_metrics_of_one_labeled_sample_give_nan_r2_not_an_error():
    """A validation split with a single labeled image of a regression task must not end the run
    (torchmetrics' R2Score raises "Needs at least two samples")."""
    task = build_tasks({"cdr": {"kind": "regression"}})["cdr"]
    metrics = task.metrics()
    task.update_metrics(metrics, torch.tensor([[0.5]]), torch.tensor([[0.4]]), {})
    values = metrics.compute()
    assert math.isnan(float(values["r2"]))
    assert float(values["mae"]) == pytest.approx(0.1)
    task.update_metrics(metrics, torch.tensor([[0.2]]), torch.tensor([[0.3]]), {})
    r2 = float(metrics.compute()["r2"])
    assert r2 == pytest.approx(1 - 0.02 / 0.005, abs=1e-4)  # two samples: the real R²
