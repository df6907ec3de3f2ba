#!/usr/bin/env bash
# A plain install must serve: do what a new user does, as README.md says it, and check each answer.
#
#   scripts/smoke-install.sh            (from the repository root; .ci/run calls it first)
#
# In a scratch copy of this tree (tracked and new files, nothing ignored): the README's "Run it"
# command, extracted from README.md and run as written (`pip install .` builds the wheel and installs
# it without extras into a fresh .venv, then `fhirvault serve`); /readyz; the README's curl example,
# extracted likewise, must create the Patient (201); a backup to a file:// target and
# `fhirvault dr drill` on it; SIGTERM to the server, which must exit 0. The only change is the port,
# so that CI does not depend on 8080 being free: FHIRVAULT_PORT for the server, 8080 -> that port in
# the curl example. Needs python3 (with venv) and curl.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/fhirvault-smoke.XXXXXX")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
phase_start=$SECONDS
step() { echo "smoke-install [$((SECONDS - phase_start))s] $*"; }
fail() { echo "smoke-install: FAILED: $*" >&2; [ -f "$SCRATCH/server.log" ] && tail -n 30 "$SCRATCH/server.log" >&2; exit 1; }

# The fenced blocks under "## Run it", in order (1: run command, 2: curl example).
readme_block() {
  awk -v want="$1" '
    /^## / { in_section = ($0 ~ /^## Run it/) ; next }
    in_section && /^```/ { if (inside) { inside = 0; n++ } else { inside = 1 }; next }
    in_section && inside && n + 1 == want { print }
  ' "$ROOT/README.md"
}
RUN_CMD=$(readme_block 1)
CURL_BLOCK=$(readme_block 2)
[ -n "$RUN_CMD" ] && [ -n "$CURL_BLOCK" ] || fail "no run command / curl example under '## Run it' in README.md"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CURL_BLOCK=${CURL_BLOCK//8080/$PORT}
BASE="http://127.0.0.1:$PORT"

step "copying the tree to $SCRATCH/checkout"
mkdir "$SCRATCH/checkout"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$ROOT" && xargs -0 cp --parents -t "$SCRATCH/checkout" 2>/dev/null || true)
else
  cp -a "$ROOT/." "$SCRATCH/checkout" && rm -rf "$SCRATCH/checkout/.venv"
fi
cd "$SCRATCH/checkout"

step "README run command: $RUN_CMD"
# Its own session: the server's pid (in the data directory's lock file) gets SIGTERM at the end.
FHIRVAULT_PORT=$PORT setsid bash -c "$RUN_CMD" >"$SCRATCH/server.log" 2>&1 &
SERVER_PID=$!
until curl -fs "$BASE/readyz" >/dev/null 2>&1; do
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the README run command exited before the server was ready"
  [ $((SECONDS - phase_start)) -lt 600 ] || fail "not ready after 600 s"
  sleep 0.5
done
step "ready: $BASE/readyz answers 200"

# Run the curl example as written; a curl shim first on PATH reports each status on stderr
# (stdout, which the example pipes into python3, is untouched).
mkdir "$SCRATCH/shim"
cat >"$SCRATCH/shim/curl" <<EOF
#!/bin/sh
exec $(command -v curl) -w '%{stderr}HTTP %{http_code} %{url_effective}\n' "\$@"
EOF
chmod +x "$SCRATCH/shim/curl"
step "README curl example"
OUT=$(PATH="$SCRATCH/shim:$PATH" bash -euo pipefail -c "$CURL_BLOCK" 2>"$SCRATCH/curl.status") ||
  fail "the curl example failed: $(cat "$SCRATCH/curl.status")"
cat "$SCRATCH/curl.status"
grep -q "^HTTP 201 $BASE/fhir/Patient\$" "$SCRATCH/curl.status" || fail "POST /fhir/Patient did not answer 201: $OUT"
python3 -c 'import json, sys; d = json.loads(sys.argv[1]); assert d["resourceType"] == "Patient" and d["id"], d' "$OUT" ||
  fail "the created Patient was not returned: $OUT"

step "backup to file:// and fhirvault dr drill"
.venv/bin/fhirvault backup create --data-dir ./fhirvault-data --target "file://$SCRATCH/backups" --location FR ||
  fail "backup create"
.venv/bin/fhirvault dr drill --data-dir ./fhirvault-data --target "file://$SCRATCH/backups" --location FR \
  --report-dir "$SCRATCH" --scratch-dir "$SCRATCH" || fail "dr drill"

loose=$(find fhirvault-data -type f -perm /077 -print)
[ -z "$loose" ] || fail "data files readable by group or others: $loose"

step "SIGTERM to the server"
SUPERVISOR=$(tr -d '[:space:]' <fhirvault-data/serve.lock)
kill -TERM "$SUPERVISOR"
rc=0
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[ "$rc" -eq 0 ] || fail "the server exited with status $rc after SIGTERM"
step "passed: README install, serve, curl 201, backup, dr drill, clean stop"
