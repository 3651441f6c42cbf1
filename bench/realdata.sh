#!/usr/bin/env bash
# The real-data results of docs/real-data.md, CPU-sized: for RetinaMNIST and IDRiD, a teacher, its
# output cache, a student distilled from the cache, the same student without KD, and each one
# evaluated on the official test split. Outputs: runs/real/<dataset>/<stage>/metrics_test.json.
#
#   bash bench/realdata.sh                 # both datasets (a finished teacher or student is kept)
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

once() {  # run_dir command...: run a stage unless it finished before (its metrics_val.json)
  local run_dir=$1
  shift
  if [ -f "$run_dir/metrics_val.json" ]; then
    echo "[realdata] $run_dir finished earlier; skipped (delete it to rerun)"
  else
    step "$@"
  fi
}

pipeline() {  # dataset "teacher overrides" "student overrides" [overrides for every stage...]
  local name=$1
  local -a teacher_args student_args
  read -ra teacher_args <<<"$2"
  read -ra student_args <<<"$3"
  shift 3
  local dir=$OUT/$name
  local common=("data=$name" "tasks=$name" logger=csv trainer.enable_progress_bar=false "$@")
  local teacher=$dir/teacher/checkpoints/best.ckpt
  local kd=("kd.cache_dir=$dir/teacher_cache" "kd.teacher=$teacher")
  once "$dir/teacher" $MTKD train-teacher "${common[@]}" "run.dir=$dir/teacher" "${teacher_args[@]}"
  step $MTKD cache-teacher "${common[@]}" "teacher=$teacher" "${kd[@]}"
  once "$dir/student" $MTKD distill "${common[@]}" "${kd[@]}" "run.dir=$dir/student" \
    "${student_args[@]}"
  once "$dir/student_nokd" $MTKD distill "${common[@]}" kd=none "run.dir=$dir/student_nokd" \
    "${student_args[@]}"
  # evaluate also reports IDRiD's joint DR+DME accuracy (test/dr_grade+dme_risk/joint_acc)
  # whenever the checkpoint has both tasks (mtkd/evaluation.py, JOINT_DEFAULTS).
  for stage in teacher student student_nokd; do
    step $MTKD evaluate "ckpt=$dir/$stage/checkpoints/best.ckpt" split=test
  done
}

# Teachers: EfficientNet-Lite2 U-Net from the packaged ImageNet weights (model=teacher_pretrained,
# 7.2 M parameters), encoder at a quarter of the learning rate, one warm-up epoch. Students: the
# default MobileNetV3-small (random init: no small network has offline ImageNet weights), at the
# learning rate of the earlier published figures.
TEACHER="model=teacher_pretrained optim.lr=0.002 optim.encoder_lr_mult=0.25 optim.warmup_epochs=1"
STUDENT="optim.lr=0.003"

[ $# -gt 0 ] || set -- idrid retinamnist
for target in "$@"; do
  case $target in
    # 128 px (28 px upsampled for the ImageNet encoder); checkpoint on validation AUC, as
    # MedMNIST selects its models.
    retinamnist)
      pipeline retinamnist "$TEACHER trainer.max_epochs=10" "$STUDENT trainer.max_epochs=20" \
        data.image_size=128 run.monitor=val/dr_grade/auroc
      ;;
    # 224 px FOV crops (one working pixel ~16 original pixels); checkpoint on the summed
    # validation loss of the three tasks.
    idrid)
      pipeline idrid "$TEACHER trainer.max_epochs=8" "$STUDENT trainer.max_epochs=15" \
        data.image_size=224
      ;;
    bench) step .venv/bin/python bench/bench_preprocess.py ;;
    *) echo "unknown target $target: use retinamnist, idrid or bench" >&2; exit 2 ;;
  esac
done
