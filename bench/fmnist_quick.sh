#!/bin/bash
# One quick Fashion-MNIST measurement of a DPAF configuration at ε = 10, δ = 1e-5:
# train with one torch thread, capped at ITER iterations (the plan lowers the noise so the
# capped run still spends the whole budget), then the evaluation the 60-minute runs use
# (20k synthetic images, CNN trained 3 epochs, real test split; a CNN trained the same way
# on 20k REAL images scores about 83 %). SEED (default 0) picks the seed.
#
#   [SEED=1] bash bench/fmnist_quick.sh WORKDIR NAME ITER [train options...]
#   python bench/quick_table.py WORKDIR > table.md
#
# Two of these run side by side on the 2-core development machine in about 9 minutes
# (900 iterations).
set -u
work=$1; name=$2; it=$3; shift 3
d=$work/$name
rm -rf "$d"; mkdir -p "$d"
py=${PYTHON:-python}
start=$(date +%s)
$py -m dpaf_ray train --dataset fashion-mnist --epsilon 10 --delta 1e-5 --seed "${SEED:-0}" \
  --max-iterations "$it" --num-threads 1 --log-every 100 --checkpoint-every 100000 --num-synthetic 1000 \
  --out "$d/run" "$@" > "$d/train.log" 2>&1
mid=$(date +%s)
OMP_NUM_THREADS=1 $py -m dpaf_ray evaluate "$d/run" --test-data fashion-mnist --num-synthetic 20000 --epochs 3 \
  --max-train-records 20000 > "$d/eval.log" 2>&1
end=$(date +%s)
echo "$name train_s=$((mid-start)) eval_s=$((end-mid)) seed=${SEED:-0} $*" > "$d/done"
