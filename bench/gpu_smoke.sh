#!/usr/bin/env bash
# GPU smoke test (issue #17): the GPU paths end to end on a machine with at least one CUDA GPU.
# Reads no network: the data is the embedded MNIST-5k (and Fashion-MNIST from Debian's package
# when it is installed, for the step-time benchmark).
#
#   bash bench/gpu_smoke.sh [OUT_DIR]          # PYTHON=... to pick the interpreter; QUICK=1 skips step 3b
#
# Steps (each prints PASS or FAIL; the summary counts them; the exit status is the number of failures):
#   0  preflight: torch sees CUDA
#   1  in-process training on the GPU, with a time budget, and its release
#   2  W = 2 Ray Train workers on ONE GPU (--gpus-per-worker 0.5), with a time budget (the stop flag's
#      all-reduce), through gloo (NCCL refuses two ranks on one device)
#   3a tune.py --use-gpu: 2 trials side by side on one GPU, each a Ray Train run of 1 worker × 0.5 GPU
#   3b tune.py --use-gpu: 2 in-process trials side by side, 0.5 GPU each (what fashion-mnist.yaml does)
#   4  step time on the GPU against the CPU (bench/step_time.py, with and without draw-ahead)
#   5  evaluate --use-gpu on the run of step 1
set -u
PY=${PYTHON:-python}
OUT=${1:-$(mktemp -d /tmp/dpaf-gpu-smoke.XXXXXX)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
unset RAY_ADDRESS  # always a local Ray here
export PYTHONUNBUFFERED=1
PASS=0
FAIL=0
RESULTS=()

step() {  # step NAME TIMEOUT_S CHECK_CMD -- CMD...
  local name=$1 limit=$2 check=$3
  shift 4
  local log="$OUT/${name// /_}.log" t0=$SECONDS
  echo "=== $name: $*" | tee "$log"
  if timeout "$limit" "$@" >>"$log" 2>&1 && bash -c "$check" >>"$log" 2>&1; then
    RESULTS+=("PASS  $name ($((SECONDS - t0)) s)"); PASS=$((PASS + 1)); echo "PASS  $name ($((SECONDS - t0)) s)"
  else
    RESULTS+=("FAIL  $name ($((SECONDS - t0)) s, log: $log)"); FAIL=$((FAIL + 1))
    echo "FAIL  $name ($((SECONDS - t0)) s); last lines of $log:"; tail -n 25 "$log"
  fi
}

step "0 preflight" 120 "true" -- "$PY" -c "
import torch, sys
ok = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())
if ok: print(torch.cuda.get_device_name(0))
sys.exit(0 if ok else 1)"
if [ "$FAIL" -gt 0 ]; then
  echo "no CUDA GPU visible: nothing else can run"; echo "SUMMARY: 0 passed, 1 failed"; exit 1
fi

step "1 in-process train --use-gpu" 600 \
  "test -f '$OUT/inproc/release/generator.pt' && test -f '$OUT/inproc/release/synthetic.parquet' && grep -q '\"stopped_early\"' '$OUT/inproc/metrics.json'" -- \
  "$PY" -m dpaf_ray train --use-gpu --epsilon 10 --iterations 200 --time-budget-minutes 5 --seed 0 \
  --out "$OUT/inproc" --num-synthetic 4000 --checkpoint-every 50 --log-every 50

step "2 W=2 on one GPU (0.5 each)" 600 \
  "test -f '$OUT/w2/release/generator.pt'" -- \
  "$PY" -m dpaf_ray train --use-gpu --num-workers 2 --gpus-per-worker 0.5 --epsilon 10 --iterations 100 \
  --time-budget-minutes 5 --seed 0 --out "$OUT/w2" --num-synthetic 1000 --checkpoint-every 50 --log-every 50

tune_check() {  # both trials finished (trial.json) and the release holds a generator
  echo "test \$(ls '$1'/trials/*/trial.json 2>/dev/null | wc -l) -eq 2 && test -f '$1/release/generator.pt'"
}
step "3a tune.py --use-gpu, 2 Train trials × 0.5 GPU" 900 "$(tune_check "$OUT/tune_train")" -- \
  "$PY" tune.py --search-space search_spaces/tiny.yaml --use-gpu --num-workers 1 --gpus-per-worker 0.5 \
  --max-concurrent-trials 2 --search tpe --expected-trials 2 --out "$OUT/tune_train"

if [ "${QUICK:-0}" != 1 ]; then
  step "3b tune.py --use-gpu, 2 in-process trials × 0.5 GPU" 900 "$(tune_check "$OUT/tune_inproc")" -- \
    "$PY" tune.py --search-space search_spaces/tiny.yaml --use-gpu --num-workers 0 --gpus-per-worker 0.5 \
    --cpus-per-worker 2 --max-concurrent-trials 2 --search tpe --expected-trials 2 --out "$OUT/tune_inproc"
fi

THREADS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
step "4a step time on the CPU ($THREADS threads)" 900 "test -f '$OUT/step_cpu.json'" -- \
  "$PY" bench/step_time.py --device cpu --threads "$THREADS" --iterations 8 --rounds 1 \
  --variants dpaf/functorch,dpsgd-gan/functorch --out "$OUT/step_cpu.json"
step "4b step time on the GPU (draw-ahead off/on)" 900 "test -f '$OUT/step_gpu.json'" -- \
  "$PY" bench/step_time.py --device cuda --threads "$THREADS" --iterations 30 --rounds 2 --draw-ahead both \
  --variants dpaf/functorch,dpaf/opacus,dpsgd-gan/functorch,dpsgd-gan/opacus --out "$OUT/step_gpu.json"
step "4c GPU over CPU step-time ratio" 60 "true" -- "$PY" - "$OUT/step_cpu.json" "$OUT/step_gpu.json" <<'EOF'
import json, sys
cpu = json.load(open(sys.argv[1]))["median_seconds"]
gpu = json.load(open(sys.argv[2]))["median_seconds"]
slower = []
for name in ("dpaf/functorch", "dpsgd-gan/functorch"):
    for key in (name, name + "+ahead"):
        if key in gpu and name in cpu:
            r = gpu[key] / cpu[name]
            print(f"{key:28s} GPU {gpu[key] * 1000:8.1f} ms  CPU {cpu[name] * 1000:8.1f} ms  GPU/CPU {r:.3f}")
            slower += [key] if r >= 1 else []
ahead = {k: v for k, v in json.load(open(sys.argv[2]))["ratios"].items() if "draw-ahead" in k}
for k, v in ahead.items():
    print(f"{k}: {v:.3f}")
sys.exit(1 if slower else 0)  # the GPU must beat the CPU
EOF

step "5 evaluate --use-gpu" 900 \
  "python3 -c \"import json,sys; m=json.load(open('$OUT/eval.json')); assert 0 <= m['downstream_accuracy'] <= 1, m\"" -- \
  "$PY" -m dpaf_ray evaluate "$OUT/inproc" --test-data mnist-5k --use-gpu --num-synthetic 4000 --epochs 1 \
  --out "$OUT/eval.json"

echo
echo "=== results (logs in $OUT)"
printf '%s\n' "${RESULTS[@]}"
echo "SUMMARY: $PASS passed, $FAIL failed"
exit "$FAIL"
