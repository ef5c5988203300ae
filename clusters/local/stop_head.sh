#!/usr/bin/env bash
# Stop the Ray head started by start_head.sh, and only it: signal the processes of the session
# recorded in $DPAF_RAY_STATE_DIR/head.sid (SIGTERM, then SIGKILL after a grace period).
# Unlike `ray stop`, this leaves other Ray clusters on the machine alone.
#
#   clusters/local/stop_head.sh            # DPAF_RAY_STATE_DIR as for start_head.sh
#   DPAF_RAY_STOP_GRACE_S=5 clusters/local/stop_head.sh
set -euo pipefail

STATE_DIR=${DPAF_RAY_STATE_DIR:-/tmp/dpaf-ray-$(id -u)}
GRACE=${DPAF_RAY_STOP_GRACE_S:-10}
SID_FILE="$STATE_DIR/head.sid"

if [[ ! -s "$SID_FILE" ]]; then
  echo "stop_head.sh: no head recorded in $SID_FILE; nothing to stop"
  rm -f "$STATE_DIR/head.env"
  exit 0
fi
SID=$(cat "$SID_FILE")
if ! [[ "$SID" =~ ^[0-9]+$ ]] || [[ "$SID" -le 1 ]]; then
  echo "stop_head.sh: bad session id '$SID' in $SID_FILE" >&2
  exit 1
fi
ME=$(id -u)

# PIDs of live (non-zombie) processes of this user in that session.
session_pids() {
  ps -e -o pid=,sid=,uid=,stat= | awk -v sid="$SID" -v uid="$ME" \
    '$2 == sid && $3 == uid && $4 !~ /^Z/ { print $1 }'
}

pids=$(session_pids)
if [[ -n "$pids" ]]; then
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq $((GRACE * 5))); do
    pids=$(session_pids)
    [[ -z "$pids" ]] && break
    sleep 0.2
  done
  # Whatever is left (a worker the raylet spawned meanwhile included) gets SIGKILL.
  for _ in 1 2 3 4 5; do
    pids=$(session_pids)
    [[ -z "$pids" ]] && break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.5
  done
fi

left=$(session_pids)
if [[ -n "$left" ]]; then
  echo "stop_head.sh: processes still running in session $SID: $left" >&2
  exit 1
fi
rm -f "$SID_FILE" "$STATE_DIR/head.env"
echo "Ray head (session $SID) stopped."
