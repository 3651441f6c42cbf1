#!/usr/bin/env bash
# mtkd GPU check: one prepared script for a CUDA machine without network access.
#
#   bench/gpu_check.sh                 # 512 px: img/s per precision, peak memory, KD cached/online
#   bench/gpu_check.sh --dry-run       # CPU, 64 px, 32-true + bf16-mixed, 2 steps (DRY_RUN=1 too)
#   bench/gpu_check.sh --batch 32      # any further argument goes to bench/gpu_check.py
#
# Environment:
#   WHEELS=/path   install missing packages from this wheel folder only
#                  (pip install --no-index --find-links $WHEELS ...); without it pip uses its index
#   PYTHON=...     interpreter (default: .venv/bin/python when present, else python3); the
#                  machine's own CUDA build of torch must already be importable by it
#   OUT=FILE       results (Markdown; figures also as JSON beside it),
#                  default bench/gpu_check_results.md
#   DRY_RUN=1      same as --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ "$PYTHON" == */* && "$PYTHON" != /* ]]; then PYTHON=$PWD/$PYTHON; fi
OUT=${OUT:-bench/gpu_check_results.md}
args=("$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then args=(--dry-run ${args[@]+"${args[@]}"}); fi
dry=0
for a in ${args[@]+"${args[@]}"}; do if [[ "$a" == --dry-run ]]; then dry=1; fi; done

pip_install() {
    if [[ -n "${WHEELS:-}" ]]; then
        "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "$@"
    else
        "$PYTHON" -m pip install "$@"
    fi
}

# import name:distribution of what a bare CUDA image usually lacks; find_spec locates a module
# without importing it (one interpreter start instead of seven heavy imports)
PACKAGES="torch:torch segmentation_models_pytorch:segmentation-models-pytorch \
albumentations:albumentations omegaconf:omegaconf wandb:wandb timm:timm lightning:lightning \
torchmetrics:torchmetrics"
missing=$("$PYTHON" -c "
import importlib.util, sys
pairs = [p.split(':') for p in sys.argv[1].split()]
print(' '.join(d for m, d in pairs if importlib.util.find_spec(m) is None))
" "$PACKAGES")
if [[ " $missing " == *" torch "* ]]; then
    echo "gpu_check: $PYTHON cannot import torch; install the machine's CUDA build first" >&2
    exit 2
fi
if [[ -n "$missing" ]]; then
    echo "gpu_check: installing $missing${WHEELS:+ from $WHEELS}"
    # shellcheck disable=SC2086  # one word per distribution
    pip_install $missing
fi
# mtkd itself, without touching the installed torch (its pin may differ from the machine's);
# looked up from / so that the repository folder on sys.path does not count as installed
if ! (cd / && "$PYTHON" -c "
import importlib.util, sys
sys.exit(importlib.util.find_spec('mtkd') is None or importlib.util.find_spec('data_modules') is None)
"); then
    echo "gpu_check: installing mtkd (editable, --no-deps)"
    "$PYTHON" -c "import setuptools" 2>/dev/null || pip_install "setuptools>=68"
    pip_install --no-deps --no-build-isolation -e .
fi

if ((dry == 0)); then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check: torch sees no CUDA device; use --dry-run (DRY_RUN=1) on a CPU" >&2
        exit 2
    }
    "$PYTHON" - <<'PY'
import torch
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
fi

exec "$PYTHON" bench/gpu_check.py --out "$OUT" ${args[@]+"${args[@]}"}
