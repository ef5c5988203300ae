#!/usr/bin/env bash
# Start a one-machine Ray head for dpaf-ray with token authentication on and the dashboard (and
# its job API) on 127.0.0.1 only. Prints the dashboard URL. Stop it with stop_head.sh.
#
#   clusters/local/start_head.sh [extra `ray start` options, e.g. --num-gpus=1]
#
# Environment (all optional):
#   RAY                      ray executable (default: `ray` on PATH)
#   DPAF_RAY_STATE_DIR       where this head's state lives (default: /tmp/dpaf-ray-$UID)
#   DPAF_RAY_TEMP_DIR        Ray's --temp-dir (default: $DPAF_RAY_STATE_DIR/ray)
#   DPAF_RAY_DASHBOARD_PORT  dashboard / job API port (default: 8265)
#   DPAF_RAY_PORT            GCS port (default: a free port)
#   DPAF_RAY_NUM_CPUS        --num-cpus (default: all)
#   DPAF_RAY_TRIAL_SLOTS     the custom `trial_slot` resource tune.py's trials hold (default 1: one
#                            trial at a time; give a --resources option yourself to replace it)
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   token source; default file ~/.ray/auth_token,
#                            created (mode 600) if no token exists yet.
#
# Only this head's processes are ever stopped: they all run in one new session whose id is
# written to $DPAF_RAY_STATE_DIR/head.sid (stop_head.sh signals exactly those processes;
# `ray stop` would kill every Ray process of this user on the machine).
set -euo pipefail

RAY=${RAY:-ray}
RAY_BIN=$(command -v "$RAY") || { echo "start_head.sh: '$RAY' not found; activate the project's venv or set RAY=" >&2; exit 1; }
RAY_BIN_DIR=$(cd "$(dirname "$RAY_BIN")" && pwd)
# Prefer the interpreter that ships with this ray (the venv's python): job entrypoints such as
# `python tune.py` run with the head's PATH, so put that directory first.
export PATH="$RAY_BIN_DIR:$PATH"
PYTHON=python3
[[ -x "$RAY_BIN_DIR/python" ]] && PYTHON="$RAY_BIN_DIR/python"

STATE_DIR=${DPAF_RAY_STATE_DIR:-/tmp/dpaf-ray-$(id -u)}
TEMP_DIR=${DPAF_RAY_TEMP_DIR:-$STATE_DIR/ray}
DASHBOARD_PORT=${DPAF_RAY_DASHBOARD_PORT:-8265}
mkdir -p "$STATE_DIR" "$TEMP_DIR"
chmod 700 "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
TEMP_DIR=$(cd "$TEMP_DIR" && pwd)

if [[ -f "$STATE_DIR/head.env" ]]; then
  echo "start_head.sh: a head is already recorded in $STATE_DIR/head.env; run clusters/local/stop_head.sh first" >&2
  exit 1
fi

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
port_in_use() {
  "$PYTHON" -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)' "$1"
}

if port_in_use "$DASHBOARD_PORT"; then
  echo "start_head.sh: port $DASHBOARD_PORT is taken; set DPAF_RAY_DASHBOARD_PORT" >&2
  exit 1
fi
GCS_PORT=${DPAF_RAY_PORT:-$(free_port)}
CLIENT_PORT=$(free_port)
AGENT_PORT=$(free_port)
METRICS_PORT=$(free_port)

# Token authentication (Ray 2.60): RAY_AUTH_MODE=token, token from RAY_AUTH_TOKEN, else the file
# named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. `ray start` does not create a token.
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  TOKEN_FILE=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  if [[ ! -s "$TOKEN_FILE" ]]; then
    (umask 077 && mkdir -p "$(dirname "$TOKEN_FILE")" &&
      "$PYTHON" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' > "$TOKEN_FILE")
    echo "start_head.sh: created a new auth token in $TOKEN_FILE" >&2
  fi
  TOKEN_SOURCE="file $TOKEN_FILE"
else
  TOKEN_SOURCE="RAY_AUTH_TOKEN"
fi
export RAY_TRAIN_ENABLE_STATE_TRACKING=${RAY_TRAIN_ENABLE_STATE_TRACKING:-1}
export RAY_USAGE_STATS_ENABLED=0

ARGS=(
  start --head
  # Ray replaces a loopback --node-ip-address with the machine's address, and the GCS, raylet
  # and object manager listen on all interfaces whatever is passed here: token auth protects
  # them. Only the dashboard honours a loopback bind.
  --node-ip-address=127.0.0.1
  --port="$GCS_PORT"
  --dashboard-host=127.0.0.1
  --dashboard-port="$DASHBOARD_PORT"
  --include-dashboard=true
  --ray-client-server-port="$CLIENT_PORT"
  --dashboard-agent-listen-port="$AGENT_PORT"
  --metrics-export-port="$METRICS_PORT"
  --temp-dir="$TEMP_DIR"
  --disable-usage-stats
)
[[ -n "${DPAF_RAY_NUM_CPUS:-}" ]] && ARGS+=(--num-cpus="$DPAF_RAY_NUM_CPUS")
# tune.py's trials hold a `trial_slot` instead of a CPU (docs/design.md §9), so that a trial and its Train
# workers never deadlock on a small machine; without it a submitted tune.py warns and falls back.
case " $* " in
  *" --resources"*) ;;
  *) ARGS+=("--resources={\"trial_slot\": ${DPAF_RAY_TRIAL_SLOTS:-1}}") ;;
esac
ARGS+=("$@")

# New session: every daemon `ray start` spawns stays in it, so the session id names this head.
rm -f "$STATE_DIR/head.sid"
set +e
setsid --wait bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$STATE_DIR/head.sid" "$RAY_BIN" "${ARGS[@]}" \
  > "$STATE_DIR/start.log" 2>&1
rc=$?
set -e
SID=$(cat "$STATE_DIR/head.sid" 2>/dev/null || true)
if [[ $rc -ne 0 ]]; then
  echo "start_head.sh: ray start failed (exit $rc); log: $STATE_DIR/start.log" >&2
  tail -n 30 "$STATE_DIR/start.log" >&2 || true
  [[ -n "$SID" ]] && DPAF_RAY_STATE_DIR="$STATE_DIR" "$(dirname "$0")/stop_head.sh" >&2 || true
  exit "$rc"
fi

DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"
cat > "$STATE_DIR/head.env" <<EOF
DPAF_RAY_SID=$SID
DPAF_RAY_TEMP_DIR=$TEMP_DIR
DPAF_RAY_GCS_PORT=$GCS_PORT
RAY_API_SERVER_ADDRESS=$DASHBOARD_URL
EOF

echo "Ray head started (session $SID, temp dir $TEMP_DIR, GCS port $GCS_PORT, token from $TOKEN_SOURCE)."
echo "Dashboard: $DASHBOARD_URL  (the browser asks for the token: ray get-auth-token)"
echo "Submit:    clusters/local/submit.sh python tune.py --search-space search_spaces/tiny.yaml --out \$PWD/runs/local"
echo "Stop:      clusters/local/stop_head.sh"
