"""GPU check: training throughput per precision, peak GPU memory, cached-vs-online KD step cost.

Run through ``bench/gpu_check.sh`` (which installs what a bare CUDA machine lacks), or directly:

    python bench/gpu_check.py [--size 512] [--batch 16] [--steps 20] [--out FILE]
    python bench/gpu_check.py --dry-run     # CPU, 64 px, 32-true + bf16-mixed, 2 steps

Each figure is one training step as Lightning runs it under ``trainer.precision`` (autocast in the
forward, float32 losses, a GradScaler for 16-mixed, an optimiser step), on batches already on the
device: the model's own speed, without data loading. Networks come from the project configs
(``model/teacher_gpu.yaml``, ``model/student.yaml``; the student network for both in the dry
run) with the synthetic task set. Writes Markdown to ``--out`` and the same figures as JSON next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mtkd.config import to_container  # noqa: E402
from mtkd.kd.teacher_source import CachedTeacher, OnlineTeacher  # noqa: E402
from mtkd.markdown import markdown_table  # noqa: E402
from mtkd.models.multitask import count_parameters  # noqa: E402
from mtkd.modules.student import StudentModule  # noqa: E402
from mtkd.modules.teacher import TeacherModule  # noqa: E402
from mtkd.run_config import load_config  # noqa: E402

AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (cudnn autotune)")
    p.add_argument("--precisions", default="32-true,bf16-mixed,16-mixed")
    p.add_argument("--teacher-model", default="teacher_gpu", help="model/ config of the teacher")
    p.add_argument("--student-model", default="student", help="model/ config of the student")
    p.add_argument("--kd-precision", default="bf16-mixed", help="precision of the KD comparison")
    p.add_argument("--out", default=str(REPO / "bench" / "gpu_check_results.md"))
    args = p.parse_args(argv)
    if args.dry_run:
        args.size, args.batch, args.steps, args.warmup = 64, 2, 2, 1
        # the small network for both roles: bf16 on a CPU without bf16 units is slow
        args.precisions, args.teacher_model, args.kd_precision = (
            "32-true,bf16-mixed",
            "student",
            "32-true",
        )
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    unknown = [s for s in args.precisions if s not in AUTOCAST]
    if unknown:
        p.error(f"unknown precision {unknown}; choose from {list(AUTOCAST)}")
    return args


def build(stage: str, model: str, device: torch.device, *overrides: str):
    """A teacher or student LightningModule from the project configs (synthetic task set)."""
    cfg = load_config(stage, [f"model={model}", "logger=none", *overrides])
    cls = TeacherModule if stage == "teacher" else StudentModule
    return cls(to_container(cfg)).to(device), cfg


def make_batch(tasks: dict, size: int, batch: int, device: torch.device) -> dict:
    """A batch in the project's batch contract with random images and placeholder targets
    (labeled for every task; values do not change the step's cost)."""
    return {
        "image": torch.randn(batch, 3, size, size, device=device),
        "targets": {
            n: torch.stack([t.empty_target(size) for _ in range(batch)]).to(device)
            for n, t in tasks.items()
        },
        "has": {n: torch.ones(batch, dtype=torch.bool, device=device) for n in tasks},
        "pixel_scale": torch.full((batch, 2), float(size), device=device),
    }


class FrozenTeacher(torch.nn.Module):
    """The frozen teacher as ``kd.mode=online`` runs it (TeacherEnsemble with one network)."""

    def __init__(self, module) -> None:
        super().__init__()
        self.net = copy.deepcopy(module.net).eval().requires_grad_(False)
        self.tasks = module.tasks

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = self.net(image)
        return {n: t.teacher_output(raw[n]) for n, t in self.tasks.items()}


def loss_fn(module, stage: str):
    if stage == "teacher":
        return lambda b: module.weighting(module.supervised_losses(module(b["image"]), b))
    return lambda b: module.step_losses(b)[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(module, step_loss, batch, precision, device, steps, warmup) -> dict[str, float]:
    """img/s and ms/step of forward + backward + optimiser step; peak memory on CUDA."""
    dtype = AUTOCAST[precision]
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    module.train()

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            loss = step_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{precision}: non-finite loss {loss.item()}")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        one()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    seconds = time.perf_counter() - start
    n = batch["image"].shape[0]
    out = {"img_s": steps * n / seconds, "ms_step": 1000 * seconds / steps}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def guarded(fn, label: str) -> dict:
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"  {label}: out of GPU memory", flush=True)
        return {"error": "OOM"}


def run(args: argparse.Namespace) -> dict:
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True  # what trainer/gpu.yaml sets
    else:
        raise SystemExit("no CUDA device visible: run with --dry-run (DRY_RUN=1) on a CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    results: dict = {
        "device": name or "cpu",
        "device_type": device.type,
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "train": [],
    }
    torch.manual_seed(0)
    teacher, _ = build("teacher", args.teacher_model, device)
    student, student_cfg = build("distill", args.student_model, device)
    tasks = teacher.tasks
    batch = make_batch(tasks, args.size, args.batch, device)
    online = FrozenTeacher(teacher)
    with torch.no_grad():
        batch["teacher"] = online(batch["image"])  # what the cache hands the student
    models = {
        "teacher": (teacher, args.teacher_model),
        "student": (student, args.student_model),
    }
    for stage, (module, model_name) in models.items():
        params = count_parameters(module.net)
        for precision in args.precisions:
            label = f"{stage} {precision}"
            print(f"timing {label} ...", flush=True)
            step_loss = loss_fn(module, "teacher" if stage == "teacher" else "distill")
            row = guarded(
                lambda m=module, s=step_loss, p=precision: time_steps(
                    m, s, batch, p, device, args.steps, args.warmup
                ),
                label,
            )
            results["train"].append(
                {
                    "model": stage,
                    "config": model_name,
                    "params_m": params / 1e6,
                    "precision": precision,
                    **row,
                }
            )
    # cached vs online KD: the same student weights and step, teacher outputs from the batch or
    # the network; one student per source, each built with its source
    kd = {}
    for mode, source in (("cached", CachedTeacher()), ("online", OnlineTeacher(online))):
        arm = StudentModule(to_container(student_cfg), source, student.tasks).to(device)
        arm.load_state_dict(student.state_dict())
        print(f"timing student KD {mode} ({args.kd_precision}) ...", flush=True)
        step_loss = loss_fn(arm, "distill")
        kd[mode] = guarded(
            lambda s=step_loss, a=arm: time_steps(
                a, s, batch, args.kd_precision, device, args.steps, args.warmup
            ),
            f"KD {mode}",
        )
    if "ms_step" in kd["cached"] and "ms_step" in kd["online"]:
        kd["online_over_cached"] = kd["online"]["ms_step"] / kd["cached"]["ms_step"]
    kd["precision"] = args.kd_precision
    results["kd"] = kd
    return results


def fmt(value, spec: str = ".1f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def markdown(r: dict) -> str:
    mode = "CPU dry run: checks the script, not a GPU measurement" if r["dry_run"] else "CUDA"
    lines = [
        "# mtkd GPU check",
        "",
        f"- device: **{r['device']}** -- {mode}",
        f"- torch {r['torch']}, CUDA {r['cuda']}",
        f"- {r['size']} px, batch {r['batch']}, {r['steps']} timed steps after "
        f"{r['warmup']} warm-up steps; one step = forward + float32 losses + backward + AdamW",
        "",
        "## Training throughput",
        "",
    ]
    header = [
        "model",
        "config",
        "params (M)",
        "precision",
        "img/s",
        "ms/step",
        "peak GPU memory (GiB)",
    ]
    rows = [
        [
            row["model"],
            row["config"],
            f"{row['params_m']:.1f}",
            row["precision"],
            fmt(row.get("img_s")),
            fmt(row.get("ms_step")),
            fmt(row.get("peak_gib"), ".2f"),
            *([row["error"]] if "error" in row else []),  # past the last column, as a note
        ]
        for row in r["train"]
    ]
    lines.append(markdown_table(header, rows, right={2, 4, 5, 6}))
    kd = r["kd"]
    lines += [
        "",
        f"## KD step: cached vs online teacher (student, {kd['precision']})",
        "",
    ]
    rows = [
        [mode, fmt(row.get("img_s")), fmt(row.get("ms_step")), fmt(row.get("peak_gib"), ".2f")]
        for mode, row in ((m, kd[m]) for m in ("cached", "online"))
    ]
    header = ["teacher outputs", "img/s", "ms/step", "peak GPU memory (GiB)"]
    lines.append(markdown_table(header, rows, right={1, 2, 3}))
    lines += ["", f"online / cached step time: {fmt(kd.get('online_over_cached'), '.2f')}x", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"results written to {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
