#!/usr/bin/env bash
# Submit a job (by default tune.py on the tiny search space) to the head started by
# start_head.sh, shipping this checkout as the job's working_dir (minus the excludes in
# clusters/runtime_env.yaml), and follow its logs until it finishes (exit 0 iff it SUCCEEDED).
#
#   clusters/local/submit.sh                                  # python tune.py --search-space search_spaces/tiny.yaml --out $PWD/runs/local
#   clusters/local/submit.sh python tune.py --search-space search_spaces/celeba64.yaml --out /abs/path/runs/celeba64
#   RAY_JOB_SUBMIT_OPTS="--no-wait --submission-id my-run" clusters/local/submit.sh python tune.py ...
#
# The same command works against a remote cluster once its dashboard is tunnelled to
# 127.0.0.1:8265 (`ray dashboard clusters/aws-gpu.yaml`, `kubectl port-forward ...`).
# Use absolute --out paths: the job runs in an unpacked copy of the working_dir, so a relative
# path lands inside that temporary copy.
#
# Environment: RAY (ray executable), RAY_API_SERVER_ADDRESS (default: from
# $DPAF_RAY_STATE_DIR/head.env, else http://127.0.0.1:8265), RAY_AUTH_TOKEN /
# RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token (the token), RAY_JOB_SUBMIT_OPTS (extra options).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO_ROOT"
RAY=${RAY:-ray}

STATE_DIR=${DPAF_RAY_STATE_DIR:-/tmp/dpaf-ray-$(id -u)}
if [[ -z "${RAY_API_SERVER_ADDRESS:-}" && -f "$STATE_DIR/head.env" ]]; then
  RAY_API_SERVER_ADDRESS=$(sed -n 's/^RAY_API_SERVER_ADDRESS=//p' "$STATE_DIR/head.env")
fi
ADDRESS=${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}

if [[ $# -eq 0 ]]; then
  set -- python tune.py --search-space search_spaces/tiny.yaml --out "$REPO_ROOT/runs/local"
fi

# Without RAY_AUTH_MODE=token the `ray job` client sends no token and the head answers 401, and so
# would the follow-up commands Ray itself prints: print ones that work as shown.
export RAY_AUTH_MODE=token
OPTS=${RAY_JOB_SUBMIT_OPTS:-}
case " $OPTS " in
  *" --submission-id"*) SUBMISSION_ID=$(sed -n 's/.*--submission-id[ =]\([^ ]*\).*/\1/p' <<<"$OPTS") ;;
  *) SUBMISSION_ID="dpaf-$(date +%Y%m%d-%H%M%S)-$$"; OPTS="$OPTS --submission-id $SUBMISSION_ID" ;;
esac
follow_ups() {
  echo "Follow-ups (copy as shown; they need the token mode):"
  echo "  RAY_AUTH_MODE=token $RAY job status $SUBMISSION_ID --address $ADDRESS"
  echo "  RAY_AUTH_MODE=token $RAY job logs --follow $SUBMISSION_ID --address $ADDRESS"
  echo "  RAY_AUTH_MODE=token $RAY job stop $SUBMISSION_ID --address $ADDRESS"
}
follow_ups
set +e
# shellcheck disable=SC2086
"$RAY" job submit \
  --address "$ADDRESS" \
  --working-dir . \
  --runtime-env clusters/runtime_env.yaml \
  $OPTS \
  -- "$@"
rc=$?
set -e
follow_ups
exit $rc
