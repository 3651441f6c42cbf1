#!/usr/bin/env bash
# The real-data results of docs/real-data.md, CPU-sized: for RetinaMNIST and IDRiD, a teacher, its
# output cache, a student distilled from the cache, the same student without KD, and each one
# evaluated on the official test split. Outputs: runs/real/<dataset>/<stage>/metrics_test.json.
#
#   bash bench/realdata.sh                 # both datasets
#   bash bench/realdata.sh retinamnist     # or one of them
#   bash bench/realdata.sh bench           # the preprocessing-cache benchmark only
set -euo pipefail
cd "$(dirname "$0")/.."
export MTKD_DATA_DIR="${MTKD_DATA_DIR:-../shared/data}"
# One OpenMP thread: on a 2-core machine shared with other jobs, two threads spin-wait on each
# other and a forward pass gets 10-90x slower; one thread is the fastest setting there.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
MTKD=.venv/bin/mtkd
OUT=runs/real

step() {  # run a command and print its wall time
  local start=$SECONDS
  "$@"
  echo "[realdata] $((SECONDS - start)) s: $*"
}

pipeline() {  # dataset teacher_epochs student_epochs [overrides for every stage...]
  local name=$1 teacher_epochs=$2 student_epochs=$3
  shift 3
  local dir=$OUT/$name
  local common=("data=$name" "tasks=$name" logger=csv trainer.enable_progress_bar=false "$@")
  local teacher=$dir/teacher/checkpoints/best.ckpt
  local kd=("kd.cache_dir=$dir/teacher_cache" "kd.teacher=$teacher")
  step $MTKD train-teacher "${common[@]}" "run.dir=$dir/teacher" \
    "trainer.max_epochs=$teacher_epochs"
  step $MTKD cache-teacher "${common[@]}" "teacher=$teacher" "${kd[@]}"
  # Students at the learning rate the published figures were measured with (docs/real-data.md).
  step $MTKD distill "${common[@]}" "${kd[@]}" "run.dir=$dir/student" \
    "trainer.max_epochs=$student_epochs" optim.lr=0.003
  step $MTKD distill "${common[@]}" kd=none "run.dir=$dir/student_nokd" \
    "trainer.max_epochs=$student_epochs" optim.lr=0.003
  # evaluate also reports IDRiD's joint DR+DME accuracy (test/dr_grade+dme_risk/joint_acc)
  # whenever the checkpoint has both tasks (mtkd/evaluation.py, JOINT_DEFAULTS).
  for stage in teacher student student_nokd; do
    step $MTKD evaluate "ckpt=$dir/$stage/checkpoints/best.ckpt" split=test
  done
}

[ $# -gt 0 ] || set -- retinamnist idrid
for target in "$@"; do
  case $target in
    # 64 px (28 px upsampled); checkpoint on validation AUC, as MedMNIST selects its models.
    retinamnist) pipeline retinamnist 15 15 run.monitor=val/dr_grade/auroc ;;
    # 128 px FOV crops; checkpoint on the summed validation loss of the three tasks.
    idrid) pipeline idrid 10 15 ;;
    bench) step .venv/bin/python bench/bench_preprocess.py ;;
    *) echo "unknown target $target: use retinamnist, idrid or bench" >&2; exit 2 ;;
  esac
done
