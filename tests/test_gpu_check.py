"""bench/gpu_check.sh: the CPU dry run writes every expected row with positive figures, and the
installer step uses only a local wheel folder when WHEELS is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"


@pytest.mark.integration
def test_gpu_check_dry_run_writes_results(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "CPU dry run" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for model in ("teacher", "student"):
        for precision in ("32-true", "bf16-mixed"):
            assert any(r.startswith(f"| {model} |") and f"| {precision} |" in r for r in rows)
    assert any(r.startswith("| cached |") for r in rows)
    assert any(r.startswith("| online |") for r in rows)
    assert "16-mixed |" not in text.replace("bf16-mixed", "")  # no fp16 rows on the CPU

    figures = json.loads(out.with_suffix(".json").read_text())
    assert figures["dry_run"] is True and figures["size"] == 64 and figures["steps"] == 2
    assert len(figures["train"]) == 4
    # Throughput and step time are two views of one measurement: img/s x s/step = the batch.
    kd = figures["kd"]
    for row in [*figures["train"], kd["cached"], kd["online"]]:
        assert row["img_s"] * row["ms_step"] / 1000 == pytest.approx(figures["batch"]), row
    # One network per model for every precision; the dry run builds the student for both.
    assert {(r["model"], r["params_m"]) for r in figures["train"]} == {
        (model, figures["train"][-1]["params_m"]) for model in ("teacher", "student")
    }
    assert figures["train"][-1]["params_m"] > 0.1  # millions: the real network, not a stub
    assert kd["online_over_cached"] == kd["online"]["ms_step"] / kd["cached"]["ms_step"]


@pytest.mark.unit
def test_gpu_check_installs_from_the_wheel_folder(tmp_path):
    """With WHEELS set, what is missing (here: timm and mtkd) comes from that folder only."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        # the package lookup reports timm missing; the mtkd lookup fails
        'if [[ "$1" == -c && "$2" == *"sys.argv[1]"* ]]; then echo timm; exit 0; fi\n'
        'if [[ "$1" == -c && "$2" == *"find_spec(\'mtkd\')"* ]]; then exit 1; fi\n'
        "exit 0\n"
    )
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "WHEELS": "/wheels", "DRY_RUN": "1"}
    env["OUT"] = str(tmp_path / "r.md")
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    pip = [c for c in calls if c.startswith("-m pip install")]
    assert pip == [
        "-m pip install --no-index --find-links /wheels timm",
        "-m pip install --no-index --find-links /wheels --no-deps --no-build-isolation -e .",
    ]
    assert calls[-1] == f"bench/gpu_check.py --out {tmp_path / 'r.md'} --dry-run"
