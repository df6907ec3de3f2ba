#!/usr/bin/env bash
# Start a fresh fhirvault on a temporary data dir, measure a machine baseline (wrk on /livez,
# the same server stack with no FHIR work) and the three CRUD modes, then stop it.
# Usage: bench/run_crud.sh [seconds]   (needs wrk: apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15}
port=${PORT:-8765}
dir=$(mktemp -d)
FHIRVAULT_CONFIG=bench/capacity.toml .venv/bin/fhirvault serve --data-dir "$dir/data" --port "$port" \
  >"$dir/server.log" 2>&1 &
server=$!
trap 'kill $server; wait $server 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break; sleep 0.1; done
echo "== baseline: wrk -c32 /livez (${secs}s)"
wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:$port/livez" | grep -E "Requests/sec|Latency"
common=(--base-url "http://127.0.0.1:$port/fhir" --client-file "$dir/data/admin-client.json"
        --clients 32 --warmup 3 --duration "$secs")
for mode in ${MODES:-crud create read}; do
  echo "== bench/crud.py --mode $mode"
  .venv/bin/python bench/crud.py "${common[@]}" --mode "$mode" | grep -E "^(create|read|update|delete|overall) |measured|errors"
done
