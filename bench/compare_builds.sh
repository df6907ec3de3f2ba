#!/usr/bin/env bash
# A/B a workload between two source trees (or two server settings), alternating runs on fresh data dirs
# so that machine noise hits both alike.
# Usage: bench/compare_builds.sh BASE_SRC NEW_SRC [seconds] [rounds]
# (BASE_SRC/NEW_SRC are 'src' directories, e.g. of a `git worktree` of an older commit; they may be the same.)
# MODE=crud|create|read (bench/crud.py, --clients 32) or MODE=ingest (bench/ingest.py, PATIENTS bundles,
# 8 clients). BASE_ARGS / NEW_ARGS: extra `serve` arguments for each side, e.g. NEW_ARGS="--workers 2".
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1; new=$2; secs=${3:-15}; rounds=${4:-2}; mode=${MODE:-crud}; patients=${PATIENTS:-60}
run() {  # $1 label, $2 src dir, $3 extra serve arguments
  local dir port server
  dir=$(mktemp -d); port=$(( 20000 + RANDOM % 20000 ))
  local config=()  # builds with the firewall get its limits out of the way (older ones refuse the table)
  [[ -f "$2/fhirvault/services/firewall_settings.py" ]] && config=(env FHIRVAULT_CONFIG=bench/capacity.toml)
  # shellcheck disable=SC2086  # $3: several words on purpose
  PYTHONPATH="$2" "${config[@]}" .venv/bin/python -m fhirvault.cli.main serve --data-dir "$dir/data" --port "$port" \
    $3 >"$dir/server.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break; sleep 0.1; done
  printf '%-5s ' "$1"
  if [[ $mode == ingest ]]; then
    .venv/bin/python bench/ingest.py --base-url "http://127.0.0.1:$port/fhir" --client-file "$dir/data/admin-client.json" \
      --patients "$patients" --clients 8 --progress-every 0 | grep -E "^ingested |^per-bundle" | tr '\n' ' ' || true
    echo
  else
    .venv/bin/python bench/crud.py --base-url "http://127.0.0.1:$port/fhir" --client-file "$dir/data/admin-client.json" \
      --clients 32 --warmup 3 --duration "$secs" --mode "$mode" | grep -E "^overall " || true
  fi
  kill "$server"; wait "$server" 2>/dev/null || true; rm -rf "$dir"
}
for r in $(seq "$rounds"); do
  if (( r % 2 )); then run base "$base" "${BASE_ARGS:-}"; run new "$new" "${NEW_ARGS:-}"
  else run new "$new" "${NEW_ARGS:-}"; run base "$base" "${BASE_ARGS:-}"; fi
done
