#!/usr/bin/env bash
# The demo's KD student against variants of it, over the demo's seeds: `mtkd demo run.seed=N`'s
# stages one by one (same settings: synthetic 600 images, 96 px, teacher 12 epochs on every label,
# students 10 epochs on a tenth of the training patients' labels), the teacher, its cache and
# the no-KD twin trained once per seed and shared by every variant; each variant's KD student
# compared with its no-KD twin by `mtkd report` (paired 95 % bootstrap intervals, test split).
# A finished run is kept, so it resumes. Outputs under runs/demo_variants/seed<N>/.
#
#   bash bench/demo_variants.sh                    # the demo's own KD student (variant "demo")
#   bash bench/demo_variants.sh demo t1 w3         # and variants (VARIANTS below)
#   python bench/demo_table.py runs/demo_variants demo   # the README's demo table
set -euo pipefail
cd "$(dirname "$0")/.."
MTKD=${MTKD:-.venv/bin/mtkd}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/demo_variants}
SEEDS=${SEEDS:-0 1 2}
common=(logger=csv trainer.enable_progress_bar=false)
students=(trainer.max_epochs=10 data.label_fraction=0.1)  # mtkd/commands/demo_runs.py's STUDENT_* settings
# and, for the KD students only, its trust_teacher overrides (KD weight on the classification heads)
trusted=$($PYTHON -c "from mtkd.commands.demo_runs import trust_teacher
from mtkd.run_config import load_config
print(*trust_teacher(load_config('distill').tasks))")  # a failure stops the script here
read -r -a trust <<< "$trusted"
# Each variant's overrides; a variant in TWINNED changes more than KD, so its no-KD twin gets the
# same overrides (the comparison stays KD vs no KD under one setting).
declare -A VARIANTS=(
  [demo]=""
  [feat]="kd.features.weight=1"
  [t1]="kd.tasks.dr_grade.temperature=1 kd.tasks.dme_risk.temperature=1 kd.tasks.glaucoma.temperature=1"
  [a5]="kd.tasks.dr_grade.alpha=0.5 kd.tasks.dme_risk.alpha=0.5 kd.tasks.glaucoma.alpha=0.5"
  [w3]="tasks.dr_grade.weight=3 tasks.dme_risk.weight=3 tasks.glaucoma.weight=3"
  [e13]="trainer.max_epochs=13"
)
TWINNED=" w3 e13 "

student() {  # run_dir overrides...: train and test a student unless done
  local run=$1
  shift
  [ -f "$run/metrics_test.json" ] && return
  $MTKD distill "${common[@]}" "${students[@]}" "run.dir=$run" run.overwrite=true "$@"
  $MTKD evaluate "ckpt=$run/checkpoints/best.ckpt"
}

[ $# -gt 0 ] || set -- demo
for seed in $SEEDS; do
  dir=$OUT/seed$seed
  teacher=$dir/teacher/checkpoints/best.ckpt
  [ -f "$dir/teacher/metrics_test.json" ] || {
    $MTKD train-teacher "${common[@]}" "run.seed=$seed" "run.dir=$dir/teacher" run.overwrite=true
    $MTKD evaluate "ckpt=$teacher"
  }
  # The cache holds the embeddings too (kd.features.weight), for the feature-KD variant.
  [ -f "$dir/cache/fingerprint.json" ] ||
    $MTKD cache-teacher "teacher=$teacher" "kd.cache_dir=$dir/cache" kd.features.weight=1
  for variant in "$@"; do
    [ -n "${VARIANTS[$variant]+set}" ] || { echo "unknown variant $variant: ${!VARIANTS[*]}" >&2; exit 2; }
    read -r -a extra <<< "${VARIANTS[$variant]}"
    twin=nokd twin_extra=()
    if [[ $TWINNED == *" $variant "* ]]; then twin=nokd_$variant twin_extra=("${extra[@]}"); fi
    student "$dir/$twin" kd=none "run.seed=$seed" "${twin_extra[@]}"
    student "$dir/$variant" "kd.cache_dir=$dir/cache" "kd.teacher=$teacher" "run.seed=$seed" \
      "${trust[@]}" "${extra[@]}"
    [ -f "$dir/report_$variant/report.json" ] || $MTKD report "teacher=$dir/teacher" \
      "student=$dir/$variant" "baseline=$dir/$twin" "out=$dir/report_$variant" > /dev/null
  done
done
