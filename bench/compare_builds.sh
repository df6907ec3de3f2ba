#!/usr/bin/env bash
# A/B the CRUD workload between two source trees, alternating runs on fresh data dirs so that
# machine noise hits both alike. Usage: bench/compare_builds.sh BASE_SRC NEW_SRC [seconds] [rounds]
# (BASE_SRC/NEW_SRC are 'src' directories, e.g. of a `git worktree` of an older commit.)
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1; new=$2; secs=${3:-15}; rounds=${4:-2}; mode=${MODE:-crud}
run() {  # $1 label, $2 src dir
  local dir port server
  dir=$(mktemp -d); port=$(( 20000 + RANDOM % 20000 ))
  local config=()  # builds with the firewall get its limits out of the way (older ones refuse the table)
  [[ -f "$2/fhirvault/services/firewall_settings.py" ]] && config=(env FHIRVAULT_CONFIG=bench/capacity.toml)
  PYTHONPATH="$2" "${config[@]}" .venv/bin/python -m fhirvault.cli.main serve --data-dir "$dir/data" --port "$port" \
    >"$dir/server.log" 2>&1 &
  server=$!
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break; sleep 0.1; done
  printf '%-5s ' "$1"
  .venv/bin/python bench/crud.py --base-url "http://127.0.0.1:$port/fhir" --client-file "$dir/data/admin-client.json" \
    --clients 32 --warmup 3 --duration "$secs" --mode "$mode" | grep -E "^overall " || true
  kill "$server"; wait "$server" 2>/dev/null || true; rm -rf "$dir"
}
for r in $(seq "$rounds"); do
  if (( r % 2 )); then run base "$base"; run new "$new"; else run new "$new"; run base "$base"; fi
done
