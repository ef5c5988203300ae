#!/bin/bash
# One quick Fashion-MNIST measurement of a DPAF configuration at ε = 10, δ = 1e-5:
# train with one torch thread, capped at ITER iterations (the plan lowers the noise so the
# capped run still spends the whole budget), then the quick evaluation (10k synthetic
# images, 2 epochs; a CNN trained on 10k REAL images scores about 73 % with these settings).
#
#   bash bench/fmnist_quick.sh WORKDIR NAME ITER [train options...]
#   python bench/quick_table.py WORKDIR > table.md
#
# Two of these run side by side on the 2-core development machine in about 9 minutes.
set -u
work=$1; name=$2; it=$3; shift 3
d=$work/$name
rm -rf "$d"; mkdir -p "$d"
py=${PYTHON:-python}
start=$(date +%s)
$py -m dpaf_ray train --dataset fashion-mnist --epsilon 10 --delta 1e-5 --seed 0 \
  --max-iterations "$it" --num-threads 1 --log-every 100 --checkpoint-every 100000 --num-synthetic 10000 \
  --out "$d/run" "$@" > "$d/train.log" 2>&1
mid=$(date +%s)
OMP_NUM_THREADS=1 $py -m dpaf_ray evaluate "$d/run" --test-data fashion-mnist --num-synthetic 10000 --epochs 2 \
  --max-train-records 10000 > "$d/eval.log" 2>&1
end=$(date +%s)
echo "$name train_s=$((mid-start)) eval_s=$((end-mid)) $*" > "$d/done"
