#!/usr/bin/env bash
# CRUD mix on SQLite (1 worker) beside PostgreSQL with 1 and N workers, back to back on this machine.
# Starts a throw-away PostgreSQL (scripts/pg-test-server.sh), a fresh data directory (and database) per run.
# Usage: bench/workers.sh [seconds] [N]
# Environment: CLIENTS=32, PROCESSES=1, MODE=crud (or create, read), RUNS="sqlite pg1 pgN" (a subset),
# ROUNDS=1 (repeat the set; each round ends with PostgreSQL's req/s over SQLite's, from that round).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
n=${2:-2}
port=${PORT:-8766}
pgport=${PGPORT:-55433}
dir=$(mktemp -d)
chmod 711 "$dir"
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  scripts/pg-test-server.sh stop "$dir/pg" || true
  rm -rf "$dir"
}
trap cleanup EXIT
admin=$(scripts/pg-test-server.sh start "$dir/pg" "$pgport")

export FHIRVAULT_CONFIG=${FHIRVAULT_CONFIG:-bench/capacity.toml}  # the firewall's limits out of the way (one address, one client)

run() {  # label, database URL ("" for SQLite), workers
  local label=$1 url=$2 workers=$3 data="$dir/data-$1-${round:-1}"
  if [ -n "$url" ]; then
    FHIRVAULT_DATABASE_URL=$url .venv/bin/fhirvault serve --data-dir "$data" --port "$port" --workers "$workers" \
      >"$dir/$label.log" 2>&1 &
  else
    .venv/bin/fhirvault serve --data-dir "$data" --port "$port" >"$dir/$label.log" 2>&1 &
  fi
  server=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  echo "== $label: workers=$workers"
  .venv/bin/python bench/crud.py --base-url "http://127.0.0.1:$port/fhir" --client-file "$data/admin-client.json" \
    --clients "${CLIENTS:-32}" --processes "${PROCESSES:-1}" --warmup 3 --duration "$secs" --mode "${MODE:-crud}" \
    | grep -E "^(create|read|update|delete|overall) |measured|errors" | tee "$dir/$label.out"
  kill "$server"; wait "$server" 2>/dev/null || true
  server=""
}

db() {  # a new database on the throw-away server
  .venv/bin/python -c "import psycopg,sys; psycopg.connect(sys.argv[1], autocommit=True).execute('CREATE DATABASE $1')" "$admin"
  echo "postgresql://postgres@127.0.0.1:$pgport/$1"
}

rps() { [ -f "$dir/$1.out" ] && awk '/^overall /{print $3}' "$dir/$1.out"; }

runs=${RUNS:-sqlite pg1 pgN}
for round in $(seq "${ROUNDS:-1}"); do
  rm -f "$dir"/*.out
  [[ " $runs " == *" sqlite "* ]] && run sqlite "" 1
  [[ " $runs " == *" pg1 "* ]] && run postgresql-1 "$(db "bench1_$round")" 1
  [[ " $runs " == *" pgN "* ]] && run "postgresql-$n" "$(db "bench2_$round")" "$n"
  base=$(rps sqlite || true)
  summary="round $round:"
  for label in sqlite postgresql-1 "postgresql-$n"; do
    r=$(rps "$label" || true)
    [ -n "$r" ] || continue
    summary+=" $label $r req/s"
    [ -n "$base" ] && [ "$label" != sqlite ] && summary+=" ($(awk -v a="$r" -v b="$base" 'BEGIN{printf "%.2fx", a/b}'))"
  done
  echo "== $summary"
done
exit 0
