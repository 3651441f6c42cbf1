#!/usr/bin/env bash
# The real-data scoreboard of docs/real-data.md, CPU-sized. For IDRiD and RetinaMNIST: a
# pretrained teacher and its output caches (logits; logits + pooled embeddings); six students,
# one seed each: {random-init MobileNetV3 (model=student), ImageNet EfficientNet-Lite0
# (model=student_pretrained)} x {no KD, logit KD, logit + feature KD}; then the KD variant with the
# best *validation* headline metric and its no-KD twin over seeds 1 and 2 as well; every student
# evaluated on the official test split, a paired report (KD - no KD, same test images) per seed,
# and the summary table (bench/scoreboard.py). Outputs under runs/real/<dataset>/. Every setting
# of the runs is in experiments/<dataset>.yaml (its sections teacher, student and
# student_pretrained); this script wires the runs together (folders, caches, arms, seeds).
#
#   bash bench/realdata.sh                 # both datasets; a finished stage is kept, so it resumes
#   bash bench/realdata.sh retinamnist     # or one of them
#   bash bench/realdata.sh bench           # the preprocessing-cache benchmark only
set -euo pipefail
cd "$(dirname "$0")/.."
export MTKD_DATA_DIR="${MTKD_DATA_DIR:-../shared/data}"
# One OpenMP thread: on a 2-core machine shared with other jobs it is the fastest setting.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
MTKD=${MTKD:-.venv/bin/mtkd}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/real}

step() {  # run a command and print its wall time
  local start=$SECONDS
  "$@"
  echo "[realdata] $((SECONDS - start)) s: $*"
}

train() {  # run_dir command...: train unless finished (metrics_val.json); resume an interrupted run
  local run_dir=$1
  shift
  if [ -f "$run_dir/metrics_val.json" ]; then
    echo "[realdata] $run_dir finished earlier; kept (delete it to rerun)"
  elif [ -f "$run_dir/checkpoints/last.ckpt" ]; then
    step "$@" "run.resume=$run_dir/checkpoints/last.ckpt"
  elif [ -f "$run_dir/checkpoints/best.ckpt" ]; then  # killed between the first epoch's two writes
    step "$@" "run.resume=$run_dir/checkpoints/best.ckpt"
  else
    step "$@"
  fi
}

tested() {  # run_dir: evaluate its best checkpoint on the test split unless done
  [ -f "$1/metrics_test.json" ] || step $MTKD evaluate "ckpt=$1/checkpoints/best.ckpt" split=test
}

cached() {  # cache_dir overrides...: write a teacher cache unless one is there
  local dir=$1
  shift
  [ -f "$dir/fingerprint.json" ] || step $MTKD cache-teacher "kd.cache_dir=$dir" "$@"
}

scoreboard() {  # dataset: the runs of experiments/<dataset>.yaml
  local name=$1 dir=$OUT/$1
  local common=(logger=csv trainer.enable_progress_bar=false)
  local teacher=$dir/teacher/checkpoints/best.ckpt
  train "$dir/teacher" $MTKD train-teacher "experiment=$name:teacher" "${common[@]}" \
    "run.dir=$dir/teacher"
  tested "$dir/teacher"

  student() {  # model (the experiment's section) arm seed
    local run=$dir/$1/$2/seed$3
    local -a recipe=("experiment=$name:$1" "${common[@]}") arm_args=()
    # One cache per student model: its input normalisation is part of the cache's fingerprint.
    case $2 in
      nokd) arm_args=(kd=none) ;;
      kd) arm_args=("kd.cache_dir=$dir/cache/$1" "kd.teacher=$teacher") ;;
      kdfeat) arm_args=("kd.cache_dir=$dir/cache_features/$1" "kd.teacher=$teacher"
        "kd.features.weight=$FEATURES") ;;
    esac
    [ "$2" = nokd ] || cached "${arm_args[0]#kd.cache_dir=}" "${recipe[@]}" "teacher=$teacher" \
      "${arm_args[@]:2}"
    train "$run" $MTKD distill "${recipe[@]}" "${arm_args[@]}" "run.seed=$3" "run.dir=$run"
    tested "$run"
  }
  for model in student student_pretrained; do
    for a in nokd kd kdfeat; do student "$model" "$a" 0; done
  done
  # The KD variant to repeat is chosen on validation, never on test.
  local best
  best=$($PYTHON bench/scoreboard.py best "$dir")
  echo "[realdata] $name: best KD variant on validation: $best"
  for seed in 0 1 2; do
    student "${best%/*}" nokd "$seed"
    student "${best%/*}" "${best#*/}" "$seed"
    local report=$dir/report/seed$seed
    [ -f "$report/report.json" ] || step $MTKD report "teacher=$dir/teacher" \
      "student=$dir/$best/seed$seed" "baseline=$dir/${best%/*}/nokd/seed$seed" "out=$report"
  done
  $PYTHON bench/scoreboard.py table "$dir" | tee "$dir/scoreboard.md"
}

FEATURES=${FEATURES:-1.0}  # the weight of the feature-KD arm (kd.features.weight)

[ $# -gt 0 ] || set -- retinamnist idrid
for target in "$@"; do
  case $target in
    retinamnist | idrid) scoreboard "$target" ;;
    bench) step $PYTHON bench/bench_preprocess.py ;;
    *) echo "unknown target $target: use retinamnist, idrid or bench" >&2; exit 2 ;;
  esac
done
