"""Speed options, measured on this CPU before any of them becomes a default.

    .venv/bin/python bench/bench_speed_options.py [--size 96] [--batch 8] [--steps 3] [--threads 1]

Training-step throughput (img/s: forward + float32 losses + backward + AdamW step, on batches
already in memory) of the teacher (``model/teacher.yaml``) and the student (``model/student.yaml``,
cached-KD step) for:

* baseline (the defaults: 32-true, channels-last tensors)
* ``model.channels_last=false`` (contiguous NCHW tensors, the default before 2026-12-08)
* ``torch.compile`` on the network (``model.compile`` is not wired into the modules yet), timed in
  a subprocess with a time limit; the compile time (first step) is reported apart. Inductor caches
  its kernels (``/tmp/torchinductor_$USER``), so a second run compiles much faster than the first.
* ``trainer.accumulate_grad_batches=2`` (one optimiser step per two batches)
* ``trainer.sync_batchnorm``: not measurable here (SyncBatchNorm refuses CPU tensors and is a
  no-op in one process); noted in the table.

and DataLoader throughput alone (samples/s over two epochs of the augmented training loader,
preprocessing cache warm) for ``data.num_workers`` 0 / 2, ``data.pin_memory`` and
``data.persistent_workers``. Prints Markdown tables (copied into docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check import build, loss_fn, make_batch, time_steps  # noqa: E402

from mtkd.config import to_container  # noqa: E402
from mtkd.markdown import markdown_table  # noqa: E402
from mtkd.run_config import load_config  # noqa: E402
from mtkd.tasks import build_tasks  # noqa: E402

CPU = torch.device("cpu")
MODELS = {"teacher": ("teacher", "teacher"), "student": ("distill", "student")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (best kept)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--compile-timeout", type=int, default=45, help="seconds per network; 0 skips compile"
    )
    p.add_argument("--samples", type=int, default=64, help="synthetic images for the loader")
    p.add_argument("--compile-worker", choices=list(MODELS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def module_for(model: str, *overrides: str):
    stage, cfg_name = MODELS[model]
    module, _ = build(stage, cfg_name, CPU, *overrides)
    return module


def with_teacher(batch: dict, module) -> dict:
    """Add cached-style teacher outputs (the student's cached-KD step reads them)."""
    with torch.no_grad():
        raw = module.net.eval()(batch["image"])
    module.train()
    return {**batch, "teacher": {n: t.teacher_output(raw[n]) for n, t in module.tasks.items()}}


def step_rate(module, model: str, args) -> float:
    batch = with_teacher(make_batch(module.tasks, args.size, args.batch, CPU), module)
    step = loss_fn(module, MODELS[model][0])
    return time_steps(module, step, batch, "32-true", CPU, args.steps, 1)["img_s"]


def accumulate_rate(module, model: str, args, accumulate: int = 2) -> float:
    """img/s with one optimiser step per ``accumulate`` batches (loss scaled like Lightning)."""
    batch = with_teacher(make_batch(module.tasks, args.size, args.batch, CPU), module)
    step = loss_fn(module, MODELS[model][0])
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.train()

    def one_optimizer_step() -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            (step(batch) / accumulate).backward()
        opt.step()

    one_optimizer_step()
    start = time.perf_counter()
    for _ in range(max(args.steps // accumulate, 1)):
        one_optimizer_step()
    seconds = time.perf_counter() - start
    return max(args.steps // accumulate, 1) * accumulate * args.batch / seconds


def compile_worker(model: str, args) -> None:
    """Subprocess body: compile the network, time the first step and the steady state."""
    torch.set_num_threads(args.threads)
    module = module_for(model)
    batch = with_teacher(make_batch(module.tasks, args.size, args.batch, CPU), module)
    module.net = torch.compile(module.net)  # after the eval-mode teacher outputs: one graph
    step = loss_fn(module, MODELS[model][0])
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.train()
    start = time.perf_counter()
    opt.zero_grad()
    step(batch).backward()
    opt.step()
    compile_s = time.perf_counter() - start
    rate = time_steps(module, step, batch, "32-true", CPU, args.steps, 1)["img_s"]
    print(json.dumps({"compile_s": compile_s, "img_s": rate}), flush=True)


def compiled_rate(model: str, args) -> dict:
    cmd = [sys.executable, __file__, "--compile-worker", model]
    cmd += ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps)]
    cmd += ["--threads", str(args.threads)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.compile_timeout, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return {"note": f"compile did not finish in {args.compile_timeout} s (cold cache?)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"note": f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}"}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - start}


def loader_rates(args, work: Path) -> list[tuple[str, float, float]]:
    """(setting, samples/s over two epochs, first-epoch seconds) of the training loader."""
    from data_modules.datamodule import FundusDataModule
    from data_modules.synthetic import generate_synthetic

    root = work / "synth"
    generate_synthetic(root, n=args.samples, image_size=128, seed=0, progress=False)
    base = [
        f"data.sources.synthetic.root={root}",
        f"data.sources.synthetic.options={{n: {args.samples}, image_size: 128, seed: 0}}",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        f"data.preprocess.cache_dir={work / 'pre'}",
        "logger=none",
    ]
    settings = {
        "num_workers=0": [],
        "num_workers=2": ["data.num_workers=2"],
        "num_workers=2, pin_memory": ["data.num_workers=2", "data.pin_memory=true"],
        "num_workers=2, persistent_workers": [
            "data.num_workers=2",
            "data.persistent_workers=true",
        ],
    }
    rows = []
    for i, (name, extra) in enumerate(settings.items()):
        cfg = load_config("teacher", base + extra)
        tasks = build_tasks(to_container(cfg)["tasks"])  # no network needed
        dm = FundusDataModule(cfg.data, tasks)
        if i == 0:  # warm the preprocessing cache once, outside the timings
            for _ in dm.train_dataloader():
                pass
        loader = dm.train_dataloader()
        n, epochs, first = 0, 2, 0.0
        start = time.perf_counter()
        for epoch in range(epochs):
            for batch in loader:
                n += batch["image"].shape[0]
            if epoch == 0:
                first = time.perf_counter() - start
        rows.append((name, n / (time.perf_counter() - start), first))
        del loader
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_worker:
        compile_worker(args.compile_worker, args)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    table: dict[str, dict[str, str]] = {}
    base: dict[str, float] = {}

    def put(option: str, model: str, value: float | None, note: str = "") -> None:
        if value is None:
            table.setdefault(option, {})[model] = note or "-"
            return
        ratio = f" ({value / base[model]:.2f}x)" if model in base and option != "baseline" else ""
        table.setdefault(option, {})[model] = f"{value:.1f}{ratio}" + (f" {note}" if note else "")

    for model in MODELS:
        print(f"baseline / contiguous / accumulation: {model} ...", file=sys.stderr)
        plain, contiguous = module_for(model), module_for(model, "model.channels_last=false")
        best = {"baseline": 0.0, "contiguous": 0.0, "accumulate": 0.0}
        for _ in range(args.rounds):  # interleaved rounds, best of: robust to a busy machine
            best["baseline"] = max(best["baseline"], step_rate(plain, model, args))
            best["contiguous"] = max(best["contiguous"], step_rate(contiguous, model, args))
            best["accumulate"] = max(best["accumulate"], accumulate_rate(plain, model, args))
        base[model] = best["baseline"]
        put("baseline", model, best["baseline"])
        put("model.channels_last=false", model, best["contiguous"])
        put("trainer.accumulate_grad_batches=2", model, best["accumulate"])
    for model in ("student", "teacher") if args.compile_timeout > 0 else ():
        print(f"torch.compile: {model} (up to {args.compile_timeout} s) ...", file=sys.stderr)
        got = compiled_rate(model, args)
        if "img_s" in got:
            put("torch.compile (net)", model, got["img_s"], f"[compile {got['compile_s']:.0f} s]")
        else:
            put("torch.compile (net)", model, None, got["note"])
    for model in MODELS:
        put(
            "trainer.sync_batchnorm=true",
            model,
            None,
            "n/a on CPU (SyncBatchNorm needs CUDA; no-op in 1 process)",
        )
    print("DataLoader ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        loader = loader_rates(args, Path(tmp))

    print(
        f"\n### Training step, CPU, {args.size} px, batch {args.batch}, "
        f"{args.threads} thread(s), best of {args.rounds} x {args.steps} timed steps "
        "(img/s; x = vs baseline)\n"
    )
    header = ["option", "teacher (ResNet-18 U-Net)", "student (MobileNetV3-small, cached KD)"]
    rows = [[o, cells.get("teacher", "-"), cells.get("student", "-")] for o, cells in table.items()]
    print(markdown_table(header, rows, right={1, 2}))
    print(
        f"\n### Training DataLoader alone, {args.size} px, batch {args.batch}, "
        f"{args.samples}-image synthetic set, 2 epochs (os.cpu_count()={os.cpu_count()})\n"
    )
    rows = [[name, f"{rate:.1f}", f"{first:.2f}"] for name, rate, first in loader]
    print(markdown_table(["data.*", "samples/s", "first epoch (s)"], rows, right={1, 2}))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
