#!/usr/bin/env bash
# Stuck heads over 8 seeds: do the demo's students' heads leave their class prior? Seeds 0-7 of
# two students, each trained as the demo trains its students (10 epochs, random weights):
#   kd        the demo's KD student: a tenth of the training patients' labels plus the teacher's
#             outputs on every training image, KD weight 0.8 on the classification heads
#             (demo_runs.trust_teacher; the teacher and cache of
#             bench/demo_variants.sh's seed 0, trained first when missing)
#   nokd_all  the same student without KD on every label: there a head at its prior is a
#             training failure, not a lack of labels (the demo's own no-KD twin, on a tenth of
#             the labels, stays at chance on DR and DME: bench/demo_variants.sh)
# then the table (bench/stuck_table.py): validation kappa of DR and DME and the dense Dice of the
# best checkpoint, and the stuck-head warnings each run logged. A finished run is kept.
#
#   bash bench/stuck_heads.sh        # outputs under runs/stuck_heads/
set -euo pipefail
cd "$(dirname "$0")/.."
MTKD=${MTKD:-.venv/bin/mtkd}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/stuck_heads}
VARIANTS_OUT=${VARIANTS_OUT:-runs/demo_variants}
SEEDS=${SEEDS:-0 1 2 3 4 5 6 7}
source=$VARIANTS_OUT/seed0
[ -f "$source/cache/fingerprint.json" ] || OUT=$VARIANTS_OUT SEEDS=0 bash bench/demo_variants.sh demo
common=(logger=csv trainer.enable_progress_bar=false trainer.max_epochs=10 run.overwrite=true)

student() {  # run_dir overrides...: train a student unless done, its log beside it
  local run=$1
  shift
  [ -f "$run/metrics_val.json" ] && return
  mkdir -p "$(dirname "$run")"
  $MTKD distill "${common[@]}" "run.dir=$run" "$@" 2>&1 | tee "$run.log" | grep -E "^epoch|^task '"
}

trusted=$($PYTHON -c "from mtkd.commands.demo_runs import trust_teacher
from mtkd.run_config import load_config
print(*trust_teacher(load_config('distill').tasks))")  # a failure stops the script here
read -r -a trust <<< "$trusted"

for seed in $SEEDS; do
  student "$OUT/kd/seed$seed" data.label_fraction=0.1 "kd.cache_dir=$source/cache" \
    "kd.teacher=$source/teacher/checkpoints/best.ckpt" "run.seed=$seed" "${trust[@]}"
  student "$OUT/nokd_all/seed$seed" kd=none "run.seed=$seed"
done
$PYTHON bench/stuck_table.py "$OUT" | tee "$OUT/table.md"
