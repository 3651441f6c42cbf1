#!/usr/bin/env bash
# Specialist teachers into one student (docs/architecture.md, "Specialist teachers").
#
#   synthetic: three specialists, each trained on its own third of the synthetic training
#     patients and its own tasks -- grading (dr_grade, dme_risk, glaucoma, cdr), lesions,
#     anatomy + landmarks -- vs one multi-task teacher on all training images vs no KD, into the
#     same student; every model evaluated on the same test split, then a comparison table.
#     The thirds are three manifests (runs/specialists/synthetic/data/third{0,1,2}) written from
#     the run's own split: each holds a third of the training patients (by a hash of the
#     patient id) plus the common val and test images, so no teacher sees another's training
#     images and all share the student's validation and test sets.
#   real: a student over the union of IDRiD and RetinaMNIST images (data=idrid_retinamnist
#     tasks=idrid), taught by an IDRiD teacher (DR grade, DME risk, landmarks; 128 px, FOV crop)
#     and a RetinaMNIST DR teacher (64 px, no FOV crop), vs the same student without KD. Train
#     the two teachers first with bench/realdata.sh (runs/real/{idrid,retinamnist}/teacher).
#
#   bash bench/specialists.sh              # both
#   bash bench/specialists.sh synthetic    # or one of them
#   SMOKE=1 bash bench/specialists.sh      # seconds per stage: 1 epoch, 64 px, 60 images
#
# The runs' settings are experiments/specialists_synthetic.yaml and specialists_real.yaml (about
# 20 min of CPU per part on a 2-core machine); this script wires the runs together (thirds, task
# subsets, teachers, caches). Outputs: $OUT/<part>/<run>/metrics_test.json and
# $OUT/<part>/comparison.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export MTKD_DATA_DIR="${MTKD_DATA_DIR:-../shared/data}"
# One OpenMP thread: on a 2-core machine shared with other jobs it is the fastest setting.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

IDRID_TEACHER=${IDRID_TEACHER:-runs/real/idrid/teacher/checkpoints/best.ckpt}
RETINAMNIST_TEACHER=${RETINAMNIST_TEACHER:-runs/real/retinamnist/teacher/checkpoints/best.ckpt}
OUT=${OUT:-runs/specialists}
SMOKE_ARGS=()
if [ -n "${SMOKE:-}" ]; then
  SMOKE_ARGS=(trainer.max_epochs=1 data.image_size=64)
fi

MTKD=${MTKD:-.venv/bin/mtkd}
PY=.venv/bin/python
COMMON=(logger=csv trainer.enable_progress_bar=false)

step() {  # run a command and print its wall time
  local start=$SECONDS
  "$@"
  echo "[specialists] $((SECONDS - start)) s: $*"
}

table() {  # part_dir run... : headline test metric per task (each task's main metric)
  local dir=$1
  shift
  $PY - "$dir" "$@" <<'EOF'
import json, sys
from pathlib import Path

from mtkd.modules.checkpoint import read_checkpoint
from mtkd.tasks import build_tasks

dir, runs = Path(sys.argv[1]), sys.argv[2:]
metrics = {r: json.loads((dir / r / "metrics_test.json").read_text())["metrics"] for r in runs}
ckpt = dir / runs[-1] / "checkpoints" / "best.ckpt"
tasks = build_tasks(read_checkpoint(ckpt)["hyper_parameters"]["config"]["tasks"])
lines = [f"| task | metric | {' | '.join(runs)} |", "|---" * (len(runs) + 2) + "|"]
for name, task in tasks.items():
    metric = task.main_metric
    cells = [metrics[r].get(f"test/{name}/{metric}") for r in runs]
    shown = " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
    lines.append(f"| {name} | {metric} | {shown} |")
text = "\n".join(lines)
(dir / "comparison.md").write_text(text + "\n")
print(f"\ntest split, {dir}:\n{text}")
EOF
}

synthetic() {
  local dir=$OUT/synthetic
  local data=(experiment=specialists_synthetic "${SMOKE_ARGS[@]}")
  [ -z "${SMOKE:-}" ] || data+=("data.sources.synthetic.root=$OUT/smoke_synthetic_data"
    "data.sources.synthetic.options={n: 60, image_size: 256, seed: 0}")
  local all=(dr_grade dme_risk glaucoma cdr lesions anatomy landmarks)
  # The three thirds, from the split every run of this part uses.
  $PY - "$dir/data" "${data[@]}" <<'EOF'
import hashlib, sys
from pathlib import Path

from data_modules.datamodule import load_samples
from data_modules.manifest import write_manifest
from mtkd.run_config import load_config

out, overrides = Path(sys.argv[1]), sys.argv[2:]
samples = load_samples(load_config("distill", overrides).data)
third = lambda s: int(hashlib.sha256(s.patient_id.encode()).hexdigest(), 16) % 3
for k in range(3):
    part = [s for s in samples if s.split != "train" or third(s) == k]
    write_manifest(part, out / f"third{k}" / "manifest.csv")
    print(f"third{k}: {sum(s.split == 'train' for s in part)} training images")
EOF
  local teachers=()
  specialist() {  # name third task...
    local name=$1 k=$2
    shift 2
    local drop=()
    for t in "${all[@]}"; do
      [[ " $* " == *" $t "* ]] || drop+=("~tasks.$t")
    done
    step $MTKD train-teacher "${COMMON[@]}" "${data[@]}" "${drop[@]}" "run.dir=$dir/$name" \
      "~data.sources.synthetic" "data.sources.third.kind=manifest" \
      "data.sources.third.root=$dir/data/third$k"
    teachers+=("teacher=$dir/$name/checkpoints/best.ckpt")
  }
  specialist teacher_grading 0 dr_grade dme_risk glaucoma cdr
  specialist teacher_lesions 1 lesions
  specialist teacher_anatomy 2 anatomy landmarks
  step $MTKD train-teacher "${COMMON[@]}" "${data[@]}" "run.dir=$dir/teacher_multi"
  step $MTKD cache-teacher "${COMMON[@]}" "${data[@]}" "${teachers[@]}" \
    "kd.cache_dir=$dir/cache_specialists"
  step $MTKD cache-teacher "${COMMON[@]}" "${data[@]}" \
    "teacher=$dir/teacher_multi/checkpoints/best.ckpt" "kd.cache_dir=$dir/cache_multi"
  local student=("${COMMON[@]}" "${data[@]}")
  step $MTKD distill "${student[@]}" "kd.cache_dir=$dir/cache_specialists" \
    "run.dir=$dir/student_specialists"
  step $MTKD distill "${student[@]}" "kd.cache_dir=$dir/cache_multi" "run.dir=$dir/student_multi"
  step $MTKD distill "${student[@]}" kd=none "run.dir=$dir/student_nokd"
  # Each specialist is evaluated on its manifest, whose test images are the common test split.
  local runs=(teacher_grading teacher_lesions teacher_anatomy teacher_multi student_specialists
    student_multi student_nokd)
  for run in "${runs[@]}"; do
    step $MTKD evaluate "ckpt=$dir/$run/checkpoints/best.ckpt" split=test logger=none
  done
  table "$dir" "${runs[@]}"
}

real() {
  local dir=$OUT/real
  for ckpt in "$IDRID_TEACHER" "$RETINAMNIST_TEACHER"; do
    if [ ! -f "$ckpt" ]; then
      echo "missing teacher $ckpt: train it with bash bench/realdata.sh idrid retinamnist" \
        "(or set IDRID_TEACHER / RETINAMNIST_TEACHER)" >&2
      exit 2
    fi
  done
  local student=("${COMMON[@]}" experiment=specialists_real "${SMOKE_ARGS[@]}")
  step $MTKD cache-teacher "${student[@]}" "teacher=$IDRID_TEACHER" \
    "teacher=$RETINAMNIST_TEACHER" "kd.cache_dir=$dir/cache"
  step $MTKD distill "${student[@]}" "kd.cache_dir=$dir/cache" "run.dir=$dir/student_specialists"
  step $MTKD distill "${student[@]}" kd=none "run.dir=$dir/student_nokd"
  for run in student_specialists student_nokd; do
    step $MTKD evaluate "ckpt=$dir/$run/checkpoints/best.ckpt" split=test logger=none
  done
  table "$dir" student_specialists student_nokd
}

[ $# -gt 0 ] || set -- synthetic real
for target in "$@"; do
  case $target in
    synthetic) synthetic ;;
    real) real ;;
    *) echo "unknown target $target: use synthetic or real" >&2; exit 2 ;;
  esac
done
