#!/usr/bin/env bash
# Stop the local high-availability cluster started by scripts/ha-up.sh DIR: the fhirvault nodes,
# HAProxy, Patroni (which stops its PostgreSQL), then etcd. Each gets SIGTERM and up to 30 s, then
# SIGKILL. The data stays in DIR (ha-up.sh DIR starts it again); --purge removes DIR afterwards.
#
#   ha-down.sh DIR [--purge]
set -uo pipefail

[ -n "${1:-}" ] || { echo "usage: $0 DIR [--purge]" >&2; exit 2; }
DIR=$(realpath -m "$1")
[ -f "$DIR/baseport" ] || { echo "ha-down: $DIR is not a cluster made by ha-up.sh" >&2; exit 2; }

# stop PIDFILE...: SIGTERM to each process group (a node's every process), then wait, then SIGKILL.
stop() {
  local f pid pids=()
  for f in "$@"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + 30))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
  done
  for f in "$@"; do rm -f "$f"; done
}

stop "$DIR"/fhirvault/node*.pid
stop "$DIR/haproxy/haproxy.pid"
stop "$DIR"/pg/n*/patroni.pid
# A PostgreSQL left running by a Patroni that was killed: stopped the way pg_ctl would (fast).
for pm in "$DIR"/pg/n*/data/postmaster.pid; do
  [ -f "$pm" ] || continue
  pid=$(head -n 1 "$pm")
  kill -0 "$pid" 2>/dev/null || continue
  kill -INT "$pid"
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
done
stop "$DIR"/etcd/e*/etcd.pid
if [ "${2:-}" = --purge ]; then
  rm -rf "$DIR"
fi
echo "ha-down: stopped the cluster in $DIR"
