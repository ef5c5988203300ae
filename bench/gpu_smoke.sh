#!/usr/bin/env bash
# GPU smoke test (issues #17, #36): the GPU paths end to end, and what a GPU step costs, on a
# machine with at least one CUDA GPU, in one command within a time budget (default 10 minutes).
# Reads no network: the data is the embedded MNIST-5k (and Fashion-MNIST from Debian's package
# when it is installed, for the profile).
#
#   bash bench/gpu_smoke.sh [OUT_DIR]
#     PYTHON=...      the interpreter
#     BUDGET_S=570    the whole script's wall-clock budget: a step gets at most what is left, and a
#                     step that would start with less than 30 s left is SKIPped (the summary says so)
#     FULL=1          also the Ray steps (2, 3a, 3b), which need more than 10 minutes together
#     DRY_RUN=1       on a machine without a GPU: every step on the CPU, through the test stand-in
#                     (DPAF_TEST_GPU_AS=cpu), to check the script itself end to end; no GPU numbers
#
# Steps (each prints PASS, FAIL or SKIP; the exit status is the number of failures):
#   0  preflight: torch sees CUDA
#   1  profile (bench/gpu_profile.py): step time of DPAF (GAN phase, classifier phase) and of the
#      DP-SGD GAN, the step-time ratio DPAF / DP-SGD GAN, the share of each step spent waiting for
#      the private draws, and the host syncs per iteration
#   2  noise throughput (bench/noise_throughput.py): secret Gaussians against torch.randn, CPU and CUDA
#   3  in-process train --use-gpu with a time budget, and its release (a classifier phase)
#   4  evaluate --use-gpu on the run of step 3
#   (FULL=1) 5  W = 2 Ray Train workers on ONE GPU (--gpus-per-worker 0.5), through gloo
#   (FULL=1) 6a tune.py --use-gpu: 2 Train trials × 0.5 GPU; 6b: 2 in-process trials × 0.5 GPU
set -u
PY=${PYTHON:-python}
OUT=${1:-$(mktemp -d /tmp/dpaf-gpu-smoke.XXXXXX)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
unset RAY_ADDRESS  # always a local Ray here
export PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-570}
DEVICE=cuda
if [ "${DRY_RUN:-0}" = 1 ]; then
  export DPAF_TEST_GPU_AS=cpu  # the test stand-in: --use-gpu computes on the CPU (never in a real run)
  DEVICE=cpu
fi
PASS=0
FAIL=0
SKIP=0
RESULTS=()

step() {  # step NAME TIMEOUT_S CHECK_CMD -- CMD...
  local name=$1 limit=$2 check=$3
  shift 4
  local log t0=$SECONDS left=$((BUDGET_S - SECONDS))
  log="$OUT/$(printf '%s' "$name" | tr -c 'A-Za-z0-9.=-' '_').log"
  LAST_LOG=$log
  if [ "$left" -lt 30 ]; then
    RESULTS+=("SKIP  $name (budget spent)"); SKIP=$((SKIP + 1)); echo "SKIP  $name: ${left}s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (at most ${limit}s): $*" | tee "$log"
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
sys.exit(0 if ok or sys.argv[1] == '1' else 1)" "${DRY_RUN:-0}"
if [ "$FAIL" -gt 0 ]; then
  echo "no CUDA GPU visible: nothing else can run"; echo "SUMMARY: 0 passed, 1 failed"; exit 1
fi

THREADS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
PROFILE_ITERS=${PROFILE_ITERS:-20}
[ "${DRY_RUN:-0}" = 1 ] && PROFILE_ITERS=2
step "1 profile: DPAF / DP-SGD GAN, draw wait, host syncs" 240 "test -f '$OUT/profile.json'" -- \
  "$PY" bench/gpu_profile.py --device "$DEVICE" --threads "$THREADS" --iterations "$PROFILE_ITERS" --draw-ahead on \
  --out "$OUT/profile.json"
sed -n '/^data /,$p' "$LAST_LOG" 2>/dev/null | head -25

NOISE_ARGS=(--samples 1048576 --repeats 5)
[ "${DRY_RUN:-0}" = 1 ] && NOISE_ARGS=(--samples 262144 --repeats 3)
step "2 noise throughput" 120 "true" -- "$PY" bench/noise_throughput.py "${NOISE_ARGS[@]}"
grep -v "^===" "$LAST_LOG" 2>/dev/null | head -30

TRAIN_ITERS=200; TRAIN_MIN=3; CLS=50; TRAIN_DATA=()
[ "${DRY_RUN:-0}" = 1 ] && { TRAIN_ITERS=4; TRAIN_MIN=2; CLS=2; TRAIN_DATA=(--dataset mnist-5k --batch-size 64 --group-size 32); }
step "3 in-process train --use-gpu" 240 \
  "test -f '$OUT/inproc/release/generator.pt' && test -f '$OUT/inproc/release/synthetic.parquet' && grep -q '\"stopped_early\"' '$OUT/inproc/metrics.json'" -- \
  "$PY" -m dpaf_ray train --use-gpu --epsilon 10 --iterations "$TRAIN_ITERS" --classifier-steps "$CLS" "${TRAIN_DATA[@]}" \
  --time-budget-minutes "$TRAIN_MIN" --seed 0 --out "$OUT/inproc" --num-synthetic 2000 --checkpoint-every 50 \
  --log-every 50

step "4 evaluate --use-gpu" 150 \
  "python3 -c \"import json,sys; m=json.load(open('$OUT/eval.json')); assert 0 <= m['downstream_accuracy'] <= 1, m\"" -- \
  "$PY" -m dpaf_ray evaluate "$OUT/inproc" --test-data mnist-5k --use-gpu --num-synthetic 2000 --epochs 1 \
  --out "$OUT/eval.json"

if [ "${FULL:-0}" = 1 ]; then
  step "5 W=2 on one GPU (0.5 each)" 600 \
    "test -f '$OUT/w2/release/generator.pt'" -- \
    "$PY" -m dpaf_ray train --use-gpu --num-workers 2 --gpus-per-worker 0.5 --epsilon 10 --iterations 100 \
    --time-budget-minutes 5 --seed 0 --out "$OUT/w2" --num-synthetic 1000 --checkpoint-every 50 --log-every 50
  tune_check() {  # both trials finished (trial.json) and the release holds a generator
    echo "test \$(ls '$1'/trials/*/trial.json 2>/dev/null | wc -l) -eq 2 && test -f '$1/release/generator.pt'"
  }
  step "6a tune.py --use-gpu, 2 Train trials × 0.5 GPU" 900 "$(tune_check "$OUT/tune_train")" -- \
    "$PY" tune.py --search-space search_spaces/tiny.yaml --use-gpu --num-workers 1 --gpus-per-worker 0.5 \
    --max-concurrent-trials 2 --search tpe --expected-trials 2 --out "$OUT/tune_train"
  step "6b tune.py --use-gpu, 2 in-process trials × 0.5 GPU" 900 "$(tune_check "$OUT/tune_inproc")" -- \
    "$PY" tune.py --search-space search_spaces/tiny.yaml --use-gpu --num-workers 0 --gpus-per-worker 0.5 \
    --cpus-per-worker 2 --max-concurrent-trials 2 --search tpe --expected-trials 2 --out "$OUT/tune_inproc"
fi

echo
echo "=== results (logs in $OUT; ${SECONDS}s of a ${BUDGET_S}s budget)"
printf '%s\n' "${RESULTS[@]}"
echo "SUMMARY: $PASS passed, $FAIL failed, $SKIP skipped"
exit "$FAIL"
