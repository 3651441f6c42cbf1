"""DDP is correct on CPU (2 gloo processes): one step equals the 2x-batch step, evaluation and the
teacher cache count every sample exactly once, and only rank 0 writes run files.

What each test proves (docs/scaling.md has the table):

* ``test_ddp_step_equals_single_process_2b_step`` -- gradient averaging across ranks of the
  teacher's supervised loss and of the student's KD + supervised loss equals the loss of one
  process on the concatenated batch: same weights after one optimiser step.
* ``test_ddp_evaluate_counts_each_sample_once`` -- ``mtkd evaluate`` under DDP on a test split of
  odd size reports the single-process metrics (no padded duplicates, uneven ranks are fine).
* ``test_ddp_cache_teacher_matches_single_process`` -- ``mtkd cache-teacher`` under DDP holds
  every training sample once, with the single-process outputs.
* ``test_ddp_only_rank_zero_writes`` -- one log version, one checkpoint folder, best + last.

Lightning relaunches ``sys.argv`` for the other rank, so the Lightning-level tests run the CLI in
a subprocess. The teacher checkpoint they share is itself trained under DDP (module fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import default_collate

from mtkd.config import to_container
from mtkd.run_config import load_config
from tests.conftest import EXACT, tiny_overrides
from tests.ddp_helpers import odd_split_file, run_cli

# -- 1. one DDP step == one single-process step on the 2x batch -------------------------------


def _freeze_batchnorm(module: torch.nn.Module) -> None:
    """BatchNorm in eval mode: it normalises with its running statistics, so each sample's output
    no longer depends on the rest of the batch (the exact-equivalence choice; see the test)."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def _one_step(module, batch: dict, lr: float) -> dict[str, torch.Tensor]:
    """One plain-SGD step (no momentum, no weight decay: the update is exactly -lr * grad)."""
    module.train()
    _freeze_batchnorm(module)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    opt.zero_grad()
    if hasattr(module, "step_losses"):
        loss, _ = module.step_losses(batch)
    else:  # the teacher: its training loss is the weighted supervised losses
        loss = module.weighting(module.supervised_losses(module(batch["image"]), batch))
    loss.backward()
    net = getattr(module.net, "module", module.net)  # unwrap DistributedDataParallel
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    return grads


def _build(stage: str, config: dict):
    from mtkd.modules.student import StudentModule
    from mtkd.modules.teacher import TeacherModule

    return (TeacherModule if stage == "teacher" else StudentModule)(config)


def _half(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s contiguous 1/world of a collated batch (nested dicts of tensors/lists)."""
    if isinstance(batch, dict):
        return {k: _half(v, rank, world) for k, v in batch.items()}
    n = len(batch) // world
    return batch[rank * n : (rank + 1) * n]


def _equivalence_worker(rank: int, world: int, init_file: str, payload: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cases = torch.load(payload, weights_only=False)
        result: dict = {}
        for stage, case in cases.items():
            module = _build(stage, case["config"])
            module.load_state_dict(case["state"])
            # DDP around the network the module calls in forward(): the loss code is unchanged.
            module.net = DistributedDataParallel(module.net)
            grads = _one_step(module, _half(case["batch"], rank, world), case["lr"])
            result[stage] = {
                "weights": {k: v.clone() for k, v in module.net.module.state_dict().items()},
                "grads": grads,
            }
        try:  # record whether SyncBatchNorm trains on CPU tensors in this torch version
            sbn = torch.nn.SyncBatchNorm(3).train()
            sbn(torch.randn(4, 3, 2, 2))
            result["sync_batchnorm_cpu"] = "ok"
        except ValueError as exc:
            result["sync_batchnorm_cpu"] = str(exc)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _full_batch(cfg, tasks, n: int) -> dict:
    from data_modules.datamodule import FundusDataModule

    ds = FundusDataModule(cfg.data, tasks).dataset("train")  # eval transform: deterministic
    return default_collate([ds[i] for i in range(n)])


@pytest.mark.ddp
@pytest.mark.integration
def test_ddp_step_equals_single_process_2b_step(synth_root, tmp_path):
    """DDP with per-rank batch b == one process with batch 2b, after one SGD step.

    BatchNorm: ``torch.nn.SyncBatchNorm`` does not run on CPU in torch 2.14 (it raises
    ``ValueError: SyncBatchNorm expected input tensor to be on GPU ...``; the worker records this
    and the test asserts it, so a torch that adds CPU support is noticed). Per-batch BatchNorm
    statistics would make the b and 2b forwards differ, so the BatchNorm layers run in eval mode
    (running statistics); everything else trains as usual. Equivalence is then exact up to float
    summation order.

    Loss relation: supervised terms average over *labeled* samples per rank and DDP averages the
    ranks' gradients, so mean-of-rank-means equals the 2b mean only when both halves hold the same
    number of labeled samples per task. The synthetic batch here is labeled for every task on
    every sample (asserted); KD terms average over all samples and match for any split.

    Tolerance: gradients within 1e-4 of the largest gradient entry, weights after the step
    (lr 0.5) within atol 1e-5 -- far below the step itself (asserted > 1e-3), so a missing
    or summed (instead of averaged) all-reduce fails.
    """
    b, world, lr = 4, 2, 0.5
    cases = {}
    for stage in ("teacher", "distill"):
        # Both stages use the small (MobileNetV3, timm BatchNormAct) network of tiny_overrides:
        # the teacher stage trains on the supervised loss, the student on KD + supervised with
        # kd=cached defaults (alpha 0.5), its teacher outputs travelling in the batch.
        over = tiny_overrides(synth_root, tmp_path, **{"data.augment": "[]"})
        cfg = load_config(stage, over)
        config = to_container(cfg)
        torch.manual_seed(0)
        module = _build(stage, config)
        batch = _full_batch(cfg, module.tasks, world * b)
        for name, has in batch["has"].items():
            assert has.all(), f"{name}: the equivalence needs every sample labeled"
        if stage == "distill":
            torch.manual_seed(1)
            teacher = _build("teacher", to_container(load_config("teacher", over)))
            with torch.no_grad():
                raw = teacher.eval()(batch["image"])
            batch["teacher"] = {n: t.teacher_output(raw[n]) for n, t in teacher.tasks.items()}
        cases[stage] = {
            "config": config,
            "state": {k: v.clone() for k, v in module.state_dict().items()},
            "batch": batch,
            "lr": lr,
        }
    payload = tmp_path / "payload.pt"
    torch.save(cases, payload)
    # fork (Linux): the workers inherit the imported modules, saving ~5 s of CPU per process
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _equivalence_worker,
        args=(world, str(tmp_path / "init"), str(payload), str(tmp_path)),
        nprocs=world,
        join=True,
        start_method=method,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert "expected input tensor to be on GPU" in ranks[0]["sync_batchnorm_cpu"], (
        "torch.nn.SyncBatchNorm now trains on CPU: switch this test (and trainer/ddp_cpu.yaml) "
        "to sync_batchnorm and update docs/scaling.md"
    )
    for stage, case in cases.items():
        module = _build(stage, case["config"])
        module.load_state_dict(case["state"])
        before = {k: v.clone() for k, v in module.net.state_dict().items()}
        grads = _one_step(module, case["batch"], lr)
        after = module.net.state_dict()
        scale = max(g.abs().max().item() for g in grads.values())
        moved = max((after[k] - before[k]).abs().max().item() for k in grads)
        assert moved > 1e-3, f"{stage}: the step barely moved the weights ({moved:.3g})"
        for r in range(world):
            got = ranks[r][stage]
            grad_diff = {n: (got["grads"][n] - g).abs().max().item() for n, g in grads.items()}
            weight_diff = {
                k: (got["weights"][k].double() - v.double()).abs().max().item()
                for k, v in after.items()
            }
            worst_g, worst_w = (
                max(grad_diff.items(), key=lambda kv: kv[1]),
                max(weight_diff.items(), key=lambda kv: kv[1]),
            )
            print(
                f"{stage} rank {r}: max |grad diff| {worst_g[1]:.2e} (largest grad {scale:.2e}), "
                f"max |weight diff| {worst_w[1]:.2e} (largest update {moved:.2e})"
            )
            assert worst_g[1] <= 1e-4 * scale, f"{stage} rank {r} gradient {worst_g}"
            assert worst_w[1] <= 1e-5, f"{stage} rank {r} weights/buffers {worst_w}"


# -- 2-4. the Lightning stages under trainer=ddp_cpu (CLI subprocesses) -----------------------


@pytest.fixture(scope="module")
def ddp_teacher(synth_root, tmp_path_factory) -> dict:
    """A tiny teacher trained by ``mtkd train-teacher trainer=ddp_cpu logger=csv`` (2 ranks);
    its run directory is what test_ddp_only_rank_zero_writes inspects."""
    work = tmp_path_factory.mktemp("ddp")
    split_file = odd_split_file(synth_root, work)
    run_dir = work / "teacher"
    base = tiny_overrides(synth_root, work, **{"data.split_file": str(split_file)})
    args = [a for a in base if not a.startswith(("run.dir=", "logger="))]
    run_cli(
        "train-teacher",
        *args,
        "trainer=ddp_cpu",
        "logger=csv",
        f"run.dir={run_dir}",
        "trainer.limit_train_batches=2",
        "trainer.log_every_n_steps=1",
    )
    return {"work": work, "run_dir": run_dir, "overrides": args, "split_file": split_file}


@pytest.mark.ddp
@pytest.mark.integration
def test_ddp_only_rank_zero_writes(ddp_teacher):
    """Rank 0 alone writes logs, checkpoints and run files: one CSV version, best + last."""
    run_dir = ddp_teacher["run_dir"]
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0"]
    metrics_csv = run_dir / "logs" / "version_0" / "metrics.csv"
    assert metrics_csv.is_file() and len(metrics_csv.read_text().splitlines()) > 1
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.ckpt",
        "config.yaml",
        "last.ckpt",
    ]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints",
        "logs",
        "metrics_val.json",
        "splits.json",
    ]  # no lightning_logs/, no second version, no leftover temporary files
    assert not list(ddp_teacher["work"].glob("lightning_logs"))


@pytest.fixture(scope="module")
def ddp_evaluation(ddp_teacher, tmp_path_factory) -> tuple[dict, dict]:
    """(single-process, 2-rank) metrics JSON of ``evaluate`` on the 7-image test split, 2 per
    batch."""
    from mtkd.stages import evaluate

    work = tmp_path_factory.mktemp("ddp_eval")
    ckpt = str(ddp_teacher["run_dir"] / "checkpoints" / "best.ckpt")
    common = ["data.eval_batch_size=2"]
    evaluate(
        ckpt,
        "test",
        [*common, "trainer.devices=1", "trainer.strategy=auto"],
        out=str(work / "single.json"),
    )
    # `trainer=ddp_cpu` as a group is not accepted by evaluate yet
    # (test_evaluate_accepts_trainer_group): the same settings as single keys.
    run_cli(
        "evaluate",
        f"ckpt={ckpt}",
        "split=test",
        f"out={work / 'ddp.json'}",
        *common,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.sync_batchnorm=false",
    )
    return tuple(json.loads((work / f"{n}.json").read_text()) for n in ("single", "ddp"))


@pytest.mark.ddp
@pytest.mark.integration
def test_ddp_evaluate_counts_each_sample_once(ddp_evaluation):
    """``mtkd evaluate`` with 2 ranks == one process: every per-task metric and loss, on a
    7-image test split, 2 images per batch.

    Lightning's default DistributedSampler would pad 7 to 8 by repeating a sample; the data
    module's UnrepeatedDistributedSampler gives the ranks 4 and 3 images (uneven batch counts),
    torchmetrics gathers the states and the labeled counts are summed. A classification accuracy
    of k/7 with 0 < k < 7 cannot be reached by 8 samples, so matching it proves the count.
    """
    single, ddp = (payload["metrics"] for payload in ddp_evaluation)
    assert sorted(ddp) == sorted(single)
    for key, value in single.items():
        if key != "test/loss":  # the total: test_ddp_evaluate_total_loss
            assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    accuracies = [v for k, v in single.items() if k.endswith("/acc")]
    assert any(0 < round(a * 7) < 7 and abs(a * 7 - round(a * 7)) < 1e-4 for a in accuracies)


@pytest.mark.ddp
@pytest.mark.integration
def test_ddp_evaluate_total_loss(ddp_evaluation):
    single, ddp = (payload["metrics"] for payload in ddp_evaluation)
    assert ddp["test/loss"] == pytest.approx(single["test/loss"], rel=1e-5)


@pytest.mark.ddp
@pytest.mark.integration
def test_ddp_evaluate_gathers_every_image_for_joint_accuracy_and_intervals(ddp_evaluation):
    """Joint accuracy and the bootstrap intervals come from the outputs each rank recorded in
    the test pass, gathered on rank 0: the same images, so the same values as one process."""
    single, ddp = ddp_evaluation
    assert "test/dr_grade+dme_risk/joint_acc" in ddp["metrics"]
    assert sorted(ddp["ci"]) == sorted(single["ci"]) and single["ci"]
    for key, interval in single["ci"].items():
        assert ddp["ci"][key] == pytest.approx(interval, rel=1e-5, abs=1e-6, nan_ok=True), key


@pytest.mark.ddp
@pytest.mark.integration
def test_ddp_cache_teacher_matches_single_process(ddp_teacher, tmp_path):
    """``mtkd cache-teacher`` with 2 ranks (33 training images: odd, 4 per batch) holds every
    training sample exactly once with the single-process outputs (float32 storage)."""
    from mtkd.stages import cache_teacher

    ckpt = str(ddp_teacher["run_dir"] / "checkpoints" / "best.ckpt")
    args = [a for a in ddp_teacher["overrides"] if not a.startswith("kd.cache_dir=")]
    args += [*EXACT, "data.eval_batch_size=4"]
    single_dir, ddp_dir = tmp_path / "single_cache", tmp_path / "ddp_cache"
    cache_teacher(
        load_config("distill", [*args, f"cache.teacher=[{ckpt}]", f"kd.cache_dir={single_dir}"])
    )
    run_cli(
        "cache-teacher",
        f"teacher={ckpt}",
        *args,
        "trainer=ddp_cpu",
        f"kd.cache_dir={ddp_dir}",
    )
    split = json.loads(ddp_teacher["split_file"].read_text())
    train_ids = sorted(k for k, v in split.items() if v == "train")
    assert len(train_ids) % 2 == 1
    single_ids = json.loads((single_dir / "index.json").read_text())
    ddp_ids = json.loads((ddp_dir / "index.json").read_text())
    assert ddp_ids == single_ids == train_ids  # every training sample, once
    fp_single = json.loads((single_dir / "fingerprint.json").read_text())
    assert json.loads((ddp_dir / "fingerprint.json").read_text()) == fp_single
    for array in sorted(single_dir.glob("*.npy")):
        a, b = np.load(array), np.load(ddp_dir / array.name)
        assert a.shape == b.shape and a.shape[0] == len(train_ids), array.name
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=array.name)
    assert not list(tmp_path.glob(".ddp_cache.*")), "shard or temporary folders left behind"


@pytest.mark.integration
def test_cache_teacher_ignores_stale_shards(ddp_teacher, tmp_path, monkeypatch):
    """A shard left behind by an earlier, crashed cache-teacher with the same run token (e.g.
    two static ``torchrun`` launches: TORCHELASTIC_RUN_ID is "none" for both) never reaches the
    cache."""
    from mtkd.stages import cache_teacher

    monkeypatch.setenv("MTKD_RUN_TOKEN", "none")
    ckpt = str(ddp_teacher["run_dir"] / "checkpoints" / "best.ckpt")
    args = [a for a in ddp_teacher["overrides"] if not a.startswith("kd.cache_dir=")]
    cache_dir = tmp_path / "cache"
    cfg = load_config(
        "distill", [*args, *EXACT, f"cache.teacher=[{ckpt}]", f"kd.cache_dir={cache_dir}"]
    )
    cache_teacher(cfg)
    clean = {p.stem: np.load(p) for p in cache_dir.glob("*.npy")}
    first = json.loads((cache_dir / "index.json").read_text())[0]
    stale_dir = tmp_path / ".cache.partial-none"  # what a crashed run under this token leaves
    stale_dir.mkdir()
    np.savez(
        stale_dir / "rank9-view0-batch0.npz",  # sorts after this run's own shards
        sample_id=np.asarray([first]),
        view=np.asarray(0),
        **{f"task_{name}": arr[:1] + 1 for name, arr in clean.items()},
    )
    cache_teacher(cfg)
    for name, arr in clean.items():
        np.testing.assert_array_equal(np.load(cache_dir / f"{name}.npy"), arr, err_msg=name)


# -- configuration facts DDP depends on (cheap, no processes) ----------------------------------


@pytest.mark.unit
def test_ddp_cpu_preset_runs_on_cpu():
    """Lightning refuses sync_batchnorm on CPU ('SyncBatchNorm layers only work with GPU
    modules'), so the 2-process CPU preset must leave it off."""
    cfg = load_config("teacher", ["trainer=ddp_cpu"])
    assert cfg.trainer.accelerator == "cpu"
    assert not cfg.trainer.get("sync_batchnorm", False)


@pytest.mark.unit
def test_evaluate_accepts_trainer_group():
    from mtkd.run_config import apply_overrides

    saved = load_config("teacher", [])
    cfg = apply_overrides(saved, ["trainer=ddp_cpu"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2


@pytest.mark.unit
def test_sync_batchnorm_keeps_the_student_network(synth_root, tmp_path):
    """The layer sync the Trainer applies under sync_batchnorm must not change the student's
    function (checked in eval mode, where SyncBatchNorm needs no process group)."""
    import copy

    from mtkd.modules.student import StudentModule
    from mtkd.modules.sync_batchnorm import TimmSyncBatchNorm
    from mtkd.stages import make_trainer

    over = tiny_overrides(synth_root, tmp_path)
    cfg = load_config("distill", [*over, "trainer=ddp_cpu", "trainer.sync_batchnorm=true"])
    trainer = make_trainer(cfg, None, [], logger=False)
    layer_sync = trainer.strategy._layer_sync
    assert type(layer_sync) is TimmSyncBatchNorm  # Lightning's own would drop timm activations
    torch.manual_seed(0)
    net = StudentModule(to_container(cfg)).net.eval()
    synced = layer_sync.apply(copy.deepcopy(net)).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = net(image), synced(image)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
