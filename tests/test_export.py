"""mtkd export: ONNX Runtime reproduces PyTorch at any batch size, metadata describes the network
well enough to rebuild and feed it, and model.pt is the bare network, safe to load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf

from mtkd.commands.export import main
from mtkd.commands.exporting import export
from mtkd.models.multitask import MultiTaskNet, count_parameters
from mtkd.modules.checkpoint import load_net
from mtkd.tasks import build_tasks
from tests.conftest import TinyRuns


@pytest.fixture(scope="module")
def exported(runs: TinyRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(runs.student, tmp_path_factory.mktemp("export"))


@pytest.mark.integration
def test_onnx_matches_pytorch_at_batch_2_and_3(runs: TinyRuns, exported: Path) -> None:
    net, tasks, cfg = load_net(runs.student)
    model = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 17
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(tasks)
    assert [i.name for i in session.get_inputs()] == ["image"]
    size = cfg.data.image_size
    generator = torch.Generator().manual_seed(0)
    for batch in (2, 3):
        image = torch.randn(batch, 3, size, size, generator=generator)
        with torch.inference_mode():
            raw = net(image)
            expected = {n: t.exported(raw[n]) for n, t in tasks.items()}
        got = session.run(None, {"image": image.numpy()})
        for name, value in zip(tasks, got):
            assert value.shape == tuple(expected[name].shape), name
            np.testing.assert_allclose(value, expected[name].numpy(), rtol=0, atol=1e-4)


@pytest.mark.integration
def test_metadata_describes_tasks_input_and_versions(runs: TinyRuns, exported: Path) -> None:
    net, tasks, cfg = load_net(runs.student)
    meta = json.loads((exported / "metadata.json").read_text())
    assert meta["stage"] == "distill"
    assert meta["parameters"] == count_parameters(net)
    assert meta["input"]["shape"] == ["batch", 3, 64, 64]
    assert meta["input"]["mean"] == list(cfg.data.mean)
    assert meta["input"]["std"] == list(cfg.data.std)
    assert meta["input"]["preprocess"]["fov_crop"] is True
    assert meta["outputs"] == list(tasks)
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["onnx_opset"] == 17
    described = meta["tasks"]
    assert {n: d["kind"] for n, d in described.items()} == {n: t.kind for n, t in tasks.items()}
    assert described["lesions"]["names"] == ["microaneurysms", "haemorrhages", "hard_exudates"]
    assert described["lesions"]["shape"] == ["batch", 3, 64, 64]
    assert described["lesions"]["activation"] == "sigmoid"
    assert described["landmarks"]["names"] == ["optic_disc", "fovea"]
    assert described["landmarks"]["shape"] == ["batch", 2, 2]
    assert described["dr_grade"]["names"] == ["0", "1", "2", "3", "4"]
    assert described["dr_grade"]["activation"] == "softmax"
    assert described["dr_grade"]["spec"]["ordinal"] is True
    assert described["cdr"]["names"] == ["cdr"] and described["cdr"]["activation"] == "none"


@pytest.mark.integration
def test_model_pt_is_the_bare_network_and_loads_safely(runs: TinyRuns, exported: Path) -> None:
    meta = json.loads((exported / "metadata.json").read_text())
    state = torch.load(exported / "model.pt", map_location="cpu", weights_only=True)
    specs = {name: d["spec"] for name, d in meta["tasks"].items()}
    fresh = MultiTaskNet(build_tasks(specs), OmegaConf.create(meta["model"]))
    fresh.load_state_dict(state)  # strict: exactly the network's tensors, nothing else
    net, _, _ = load_net(runs.student)
    image = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        a, b = fresh.eval()(image), net(image)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # No optimiser state and no teacher: far smaller than the training checkpoint.
    assert (exported / "model.pt").stat().st_size < runs.student.stat().st_size / 2
    assert sorted(p.name for p in exported.iterdir()) == ["metadata.json", "model.onnx", "model.pt"]


@pytest.mark.unit
def test_export_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="export needs ckpt="):
        main([])
    with pytest.raises(ValueError, match="unknown arguments"):
        main(["ckpt=x.ckpt", "format=tflite"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["ckpt=/nonexistent/best.ckpt"])
