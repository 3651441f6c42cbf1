#!/usr/bin/env bash
# Written reports on the synthetic set (issue 19; docs/study.md, "Written reports"): the demo's
# pipeline with a text task added by experiments/text_reports.yaml: teacher, cache, KD student and
# its no-KD twin on a quarter of the labels, each evaluated on the test split, then the report's
# bootstrap intervals (runs/text/report/report.md). About 25 min of CPU on 2 cores.
#
#   bash bench/text_reports.sh            # or ARGS="run.seed=1" bash bench/text_reports.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
MTKD=${MTKD:-.venv/bin/mtkd}
OUT=${OUT:-runs/text}
read -r -a EXTRA <<<"${ARGS:-}"
COMMON=(logger=csv trainer.enable_progress_bar=false "${EXTRA[@]}")
STUDENT=(experiment=text_reports:student "${COMMON[@]}")

$MTKD train-teacher experiment=text_reports run.dir="$OUT/teacher" "${COMMON[@]}"
TEACHER=$OUT/teacher/checkpoints/best.ckpt
$MTKD evaluate ckpt="$TEACHER" split=test
$MTKD cache-teacher "${STUDENT[@]}" "cache.teacher=[$TEACHER]" kd.cache_dir="$OUT/cache"
$MTKD distill "${STUDENT[@]}" kd.cache_dir="$OUT/cache" run.dir="$OUT/student"
$MTKD distill "${STUDENT[@]}" kd=none run.dir="$OUT/student_nokd"
for run in student student_nokd; do
  $MTKD evaluate ckpt="$OUT/$run/checkpoints/best.ckpt" split=test
done
$MTKD report teacher="$OUT/teacher" student="$OUT/student" baseline="$OUT/student_nokd" \
  out="$OUT/report"
