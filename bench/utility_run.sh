#!/bin/bash
# One measurement for issue #13 (utility of the privacy budget): train at ε = EPS,
# δ = 1e-5 with one torch thread, then evaluate. EVAL=quick (default): 20k synthetic images and a
# 20k cap on each CNN's training set (screening); EVAL=full: the evaluate command's defaults
# (60k synthetic, 3 epochs; docs/design.md §7). Also prints the DP label classifier's own test accuracy
# when the run has one (bench/classifier_accuracy.py).
#
#   [DATASET=mnist-5k] EPS=1 SEED=0 [EVAL=full] bash bench/utility_run.sh WORKDIR NAME [train options...]
#   python bench/utility_table.py WORKDIR > table.md
set -u
work=$1; name=$2; shift 2
d=$work/$name
rm -rf "$d"; mkdir -p "$d"
py=${PYTHON:-python}
export OMP_NUM_THREADS=1
start=$(date +%s)
$py -m dpaf_ray train --dataset "${DATASET:-fashion-mnist}" --epsilon "${EPS:-10}" --delta 1e-5 --seed "${SEED:-0}" \
  --num-threads 1 --log-every 100 --checkpoint-every 100000 --num-synthetic 1000 \
  --out "$d/run" "$@" > "$d/train.log" 2>&1
mid=$(date +%s)
if [ "${EVAL:-quick}" = full ]; then
  $py -m dpaf_ray evaluate "$d/run" --test-data "${DATASET:-fashion-mnist}" > "$d/eval.log" 2>&1
else
  $py -m dpaf_ray evaluate "$d/run" --test-data "${DATASET:-fashion-mnist}" --num-synthetic 20000 --epochs 3 \
    --max-train-records 20000 > "$d/eval.log" 2>&1
fi
end=$(date +%s)
$py bench/classifier_accuracy.py "$d/run" > "$d/classifier.json" 2> "$d/classifier.err"
echo "$name train_s=$((mid-start)) eval_s=$((end-mid)) seed=${SEED:-0} eps=${EPS:-10} eval=${EVAL:-quick} dataset=${DATASET:-fashion-mnist} $*" > "$d/done"
