#!/usr/bin/env bash
# The reference high-availability deployment on one machine (docs/high-availability.md):
# 3 etcd members, Patroni/PostgreSQL nodes with synchronous replication, fhirvault nodes on the
# Patroni cluster (multi-host URL), HAProxy in front. Every process listens on 127.0.0.1 only, on its
# own port, with its own directory under DIR.
#
#   ha-up.sh DIR [BASEPORT]     start whatever is not running, wait until all is healthy, print the
#                               endpoints (also in DIR/cluster.json). Idempotent: run it again after a
#                               crash and it restarts what is missing (an old primary rejoins as a replica).
#   scripts/ha-down.sh DIR      stop it all
#
# Ports: BASEPORT (default 25400) + 0..2 etcd clients, +10..12 etcd peers, +20..22 Patroni REST,
# +30..32 PostgreSQL, +40 HAProxy PostgreSQL primary, +41 HAProxy FHIR HTTP, +42 HAProxy stats,
# +50.. fhirvault nodes. Environment: HA_PG_NODES (3), HA_FV_NODES (2), HA_FV_WORKERS (1),
# HA_FHIRVAULT (the fhirvault command, default `fhirvault` on PATH), HA_TIMEOUT (seconds, 180).
# Installs the Debian packages it needs when they are missing (root, apt-get). PostgreSQL refuses to
# run as root: when run as root, Patroni and PostgreSQL run as the `postgres` user.
set -euo pipefail

usage() { echo "usage: $0 DIR [BASEPORT]" >&2; exit 2; }
[ -n "${1:-}" ] || usage
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TEMPLATES=$ROOT/deploy/ha
DIR=$(realpath -m "$1")
PG_NODES=${HA_PG_NODES:-3}
FV_NODES=${HA_FV_NODES:-2}
FV_WORKERS=${HA_FV_WORKERS:-1}
FHIRVAULT=${HA_FHIRVAULT:-fhirvault}
TIMEOUT=${HA_TIMEOUT:-180}
PY=/usr/bin/python3  # Debian's Python: Patroni's, and ours for the health checks (standard library only)

mkdir -p "$DIR"
# The base port is chosen once per cluster directory.
if [ -f "$DIR/baseport" ]; then
  BASE=$(cat "$DIR/baseport")
  if [ -n "${2:-}" ] && [ "$2" != "$BASE" ]; then
    echo "$DIR was set up with base port $BASE, not $2" >&2; exit 2
  fi
else
  BASE=${2:-25400}
  echo "$BASE" > "$DIR/baseport"
fi

log() { echo "ha-up: $*" >&2; }
die() { echo "ha-up: error: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# -- packages ---------------------------------------------------------------------------------------
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v haproxy >/dev/null || need+=(haproxy)
[ -x /usr/bin/patroni ] || need+=(patroni)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing packages: ${need[*]} (apt-get install them as root)"
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PATRONI=(/usr/bin/patroni)
if ! $PY -c 'import patroni.dcs.etcd3' 2>/dev/null; then
  # An older Debian Patroni without the etcd v3 API: PyPI's, in a venv on Debian's Python.
  if [ ! -x "$DIR/patroni-venv/bin/patroni" ]; then
    log "this Patroni lacks etcd3 support: installing patroni[etcd3] from PyPI into $DIR/patroni-venv"
    $PY -m venv "$DIR/patroni-venv"
    "$DIR/patroni-venv/bin/pip" install -q 'patroni[etcd3]' 'psycopg[binary]'
  fi
  PATRONI=("$DIR/patroni-venv/bin/patroni")
fi

# -- layout, ports, secrets -------------------------------------------------------------------------
etcd_client() { echo $((BASE + $1 - 1)); }
etcd_peer() { echo $((BASE + 10 + $1 - 1)); }
rest_port() { echo $((BASE + 20 + $1 - 1)); }
pg_port() { echo $((BASE + 30 + $1 - 1)); }
PG_FRONT=$((BASE + 40)); HTTP=$((BASE + 41)); STATS=$((BASE + 42))
fv_port() { echo $((BASE + 50 + $1 - 1)); }

mkdir -p "$DIR"/{etcd,pg,haproxy,fhirvault,secrets}
chmod 700 "$DIR/secrets" "$DIR/fhirvault"
if [ "$(id -u)" = 0 ]; then
  chown postgres:postgres "$DIR/pg"
  p=$DIR  # the postgres user must be able to reach DIR/pg
  while [ "$p" != / ]; do chmod o+x "$p"; p=$(dirname "$p"); done
fi
secret() {  # a random password, created once
  local f=$DIR/secrets/$1
  [ -s "$f" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$f")
  cat "$f"
}
SUPER_PW=$(secret postgres); REPL_PW=$(secret replicator); REWIND_PW=$(secret rewinder)
OWNER_PW=$(secret fhirvault_owner); WEB_PW=$(secret fhirvault_web)

render() {  # render TEMPLATE OUT KEY=VALUE...: replace each @KEY@
  local template=$1 out=$2; shift 2
  local text; text=$(cat "$template")
  local kv
  for kv in "$@"; do text=${text//"@${kv%%=*}@"/"${kv#*=}"}; done
  (umask 077; printf '%s\n' "$text" > "$out.tmp")
  mv "$out.tmp" "$out"
}

# Waits until COMMAND succeeds, up to TIMEOUT seconds; says what it waited for if it never does.
wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.5
  done
}
http_ok() {  # http_ok URL: status 200
  $PY - "$1" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

# -- etcd -------------------------------------------------------------------------------------------
ETCD_CLUSTER=""; ETCD_HOSTS=""; ETCD_ENDPOINTS=""
for i in 1 2 3; do
  ETCD_CLUSTER+="${ETCD_CLUSTER:+,}e$i=http://127.0.0.1:$(etcd_peer $i)"
  ETCD_HOSTS+="${ETCD_HOSTS:+,}127.0.0.1:$(etcd_client $i)"
  ETCD_ENDPOINTS+="${ETCD_ENDPOINTS:+,}http://127.0.0.1:$(etcd_client $i)"
done
for i in 1 2 3; do
  d=$DIR/etcd/e$i
  mkdir -p "$d"
  alive "$d/etcd.pid" && continue
  render "$TEMPLATES/etcd.yml.in" "$d/etcd.yml" NAME="e$i" DATA="$d/data" CLIENT_PORT="$(etcd_client $i)" \
    PEER_PORT="$(etcd_peer $i)" INITIAL_CLUSTER="$ETCD_CLUSTER"
  log "starting etcd member e$i"
  setsid etcd --config-file "$d/etcd.yml" >>"$d/etcd.log" 2>&1 < /dev/null &
  echo $! > "$d/etcd.pid"
done
export ETCDCTL_API=3
wait_for "the etcd cluster (3 healthy members; $DIR/etcd/e*/etcd.log)" \
  etcdctl --endpoints="$ETCD_ENDPOINTS" --command-timeout=2s endpoint health

# -- Patroni / PostgreSQL ---------------------------------------------------------------------------
PG_HOSTS=""
for i in $(seq 1 "$PG_NODES"); do PG_HOSTS+="${PG_HOSTS:+,}127.0.0.1:$(pg_port "$i")"; done
for i in $(seq 1 "$PG_NODES"); do
  d=$DIR/pg/n$i
  as_pg mkdir -p "$d"
  alive "$d/patroni.pid" && continue
  render "$TEMPLATES/patroni.yml.in" "$d/patroni.yml" NAME="n$i" REST_PORT="$(rest_port "$i")" \
    ETCD_HOSTS="$ETCD_HOSTS" PG_PORT="$(pg_port "$i")" DATA="$d/data" PG_BIN="$PG_BIN" NODE_DIR="$d" \
    SUPER_PASSWORD="$SUPER_PW" REPL_USER=replicator REPL_PASSWORD="$REPL_PW" REWIND_PASSWORD="$REWIND_PW"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$d/patroni.yml"
  log "starting Patroni node n$i"
  # Its own session: a test kills the node (Patroni and its PostgreSQL) by process group.
  as_pg sh -c 'cd "$1" && setsid "$2" patroni.yml >> patroni.log 2>&1 < /dev/null & echo $! > "$1/patroni.pid"' \
    sh "$d" "${PATRONI[0]}"
done

cluster_ready() {  # a leader, every node running/streaming, and a synchronous standby (if >1 node)
  $PY - "http://127.0.0.1:$(rest_port 1)" "$PG_NODES" "$@" <<'EOF'
import json, sys, urllib.request
base, want = sys.argv[1], int(sys.argv[2])
urls = [base.rsplit(":", 1)[0] + ":" + str(int(base.rsplit(":", 1)[1]) + i) for i in range(want)]
for url in urls:  # any node that answers knows the cluster (it reads it from etcd)
    try:
        with urllib.request.urlopen(url + "/cluster", timeout=2) as r:
            members = json.load(r)["members"]
        break
    except Exception:
        continue
else:
    sys.exit(1)
roles = [m["role"] for m in members]
ok = (len(members) == want and roles.count("leader") == 1
      and all(m["state"] in ("running", "streaming") for m in members)
      and (want == 1 or "sync_standby" in roles))
sys.exit(0 if ok else 1)
EOF
}
wait_for "the Patroni cluster (a leader, $PG_NODES nodes running, a synchronous standby; $DIR/pg/n*/patroni.log)" \
  cluster_ready

leader_port() {
  local i
  for i in $(seq 1 "$PG_NODES"); do
    http_ok "http://127.0.0.1:$(rest_port "$i")/primary" && { pg_port "$i"; return 0; }
  done
  return 1
}
LEADER_PG=$(leader_port) || die "no Patroni node answers /primary"
psql_super() {
  PGPASSWORD=$SUPER_PW "$PG_BIN/psql" -h 127.0.0.1 -p "$LEADER_PG" -U postgres -d "${PSQL_DB:-postgres}" \
    -v ON_ERROR_STOP=1 -qAt "$@"
}

# -- fhirvault --------------------------------------------------------------------------------------
# The database and its owner role (runs the schema migrations); the server logs in as fhirvault_web,
# a member of the fhirvault_app group role that `fhirvault init` creates (docs/postgresql.md "Roles").
FV=$DIR/fhirvault
(umask 077; printf '*:*:fhirvault:fhirvault_owner:%s\n*:*:fhirvault:fhirvault_web:%s\n' "$OWNER_PW" "$WEB_PW" \
  > "$FV/pgpass")
if [ "$(psql_super -c "SELECT 1 FROM pg_roles WHERE rolname='fhirvault_owner'")" != 1 ]; then
  # The password on stdin (a psql variable), not on a command line other users can read in ps.
  psql_super -v pw="$OWNER_PW" <<< "CREATE ROLE fhirvault_owner LOGIN CREATEROLE PASSWORD :'pw'"
fi
if [ "$(psql_super -c "SELECT 1 FROM pg_database WHERE datname='fhirvault'")" != 1 ]; then
  psql_super -c "CREATE DATABASE fhirvault OWNER fhirvault_owner"
fi
for i in $(seq 1 "$FV_NODES"); do
  mkdir -p "$FV/node$i"; chmod 700 "$FV/node$i"
  render "$TEMPLATES/fhirvault.toml.in" "$FV/node$i/fhirvault.toml" NAME="node$i" DATA="$FV/node$i" \
    ROOT_KEY="$FV/root.key" PORT="$(fv_port "$i")" WORKERS="$FV_WORKERS" HTTP_PORT="$HTTP" \
    PG_HOSTS="$PG_HOSTS" PGPASS="$FV/pgpass" WITNESS="$FV/audit-witness.log"
done
if [ ! -f "$FV/root.key" ]; then
  log "initialising fhirvault (root key $FV/root.key, admin client $FV/admin-client.json)"
  FHIRVAULT_DATABASE_URL="postgresql://fhirvault_owner@$PG_HOSTS/fhirvault?target_session_attrs=read-write&passfile=$FV/pgpass" \
    $FHIRVAULT init --data-dir "$FV/node1" >/dev/null
  mv "$FV/node1/admin-client.json" "$FV/admin-client.json"
fi
if [ "$(psql_super -c "SELECT 1 FROM pg_roles WHERE rolname='fhirvault_web'")" != 1 ]; then
  psql_super -v pw="$WEB_PW" <<< "CREATE ROLE fhirvault_web LOGIN PASSWORD :'pw' IN ROLE fhirvault_app"
fi
for i in $(seq 1 "$FV_NODES"); do
  d=$FV/node$i
  alive "$d.pid" && continue
  log "starting fhirvault node$i"
  setsid $FHIRVAULT serve --data-dir "$d" >>"$d.log" 2>&1 < /dev/null &
  echo $! > "$d.pid"
done

# -- HAProxy ----------------------------------------------------------------------------------------
pg_servers=""; fv_servers=""
for i in $(seq 1 "$PG_NODES"); do
  pg_servers+="    server n$i 127.0.0.1:$(pg_port "$i") check port $(rest_port "$i")"$'\n'
done
for i in $(seq 1 "$FV_NODES"); do
  fv_servers+="    server node$i 127.0.0.1:$(fv_port "$i") check"$'\n'
done
H=$DIR/haproxy
old_cfg=$(cat "$H/haproxy.cfg" 2>/dev/null || true)
render "$TEMPLATES/haproxy.cfg.in" "$H/haproxy.cfg" PIDFILE="$H/haproxy.pid" PG_FRONT_PORT="$PG_FRONT" \
  HTTP_PORT="$HTTP" STATS_PORT="$STATS" PG_SERVERS="${pg_servers%$'\n'}" FV_SERVERS="${fv_servers%$'\n'}"
haproxy -c -q -f "$H/haproxy.cfg" || die "HAProxy refuses $H/haproxy.cfg"
if ! alive "$H/haproxy.pid"; then
  log "starting HAProxy"
  haproxy -D -f "$H/haproxy.cfg"
elif [ "$old_cfg" != "$(cat "$H/haproxy.cfg")" ]; then
  log "reloading HAProxy (its configuration changed)"
  haproxy -D -f "$H/haproxy.cfg" -sf "$(cat "$H/haproxy.pid")"  # the old process finishes its requests
fi

for i in $(seq 1 "$FV_NODES"); do
  wait_for "fhirvault node$i /readyz ($FV/node$i.log)" http_ok "http://127.0.0.1:$(fv_port "$i")/readyz"
done
wait_for "HAProxy's FHIR frontend" http_ok "http://127.0.0.1:$HTTP/readyz"

# -- endpoints --------------------------------------------------------------------------------------
$PY - "$DIR" "$BASE" "$PG_NODES" "$FV_NODES" <<'EOF'
import json, sys
d, base, pg, fv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
info = {
    "dir": d,
    "fhir": f"http://127.0.0.1:{base + 41}/fhir",
    "http": f"http://127.0.0.1:{base + 41}",
    "postgres_primary": f"127.0.0.1:{base + 40}",
    "haproxy_stats": f"http://127.0.0.1:{base + 42}/stats",
    "admin_client": f"{d}/fhirvault/admin-client.json",
    "etcd": [f"http://127.0.0.1:{base + i}" for i in range(3)],
    "patroni": [{"name": f"n{i + 1}", "rest": f"http://127.0.0.1:{base + 20 + i}", "port": base + 30 + i,
                 "dir": f"{d}/pg/n{i + 1}"} for i in range(pg)],
    "fhirvault": [{"name": f"node{i + 1}", "url": f"http://127.0.0.1:{base + 50 + i}",
                   "data_dir": f"{d}/fhirvault/node{i + 1}", "pid_file": f"{d}/fhirvault/node{i + 1}.pid"}
                  for i in range(fv)],
}
with open(f"{d}/cluster.json", "w") as f:
    json.dump(info, f, indent=2)
print(f"FHIR API (HAProxy):        {info['fhir']}")
print(f"admin client credentials:  {info['admin_client']}")
print(f"PostgreSQL primary:        {info['postgres_primary']} (HAProxy, Patroni /primary check)")
print(f"HAProxy stats:             {info['haproxy_stats']}")
for n in info["fhirvault"]:
    print(f"fhirvault {n['name']}:           {n['url']}  (data dir {n['data_dir']})")
for n in info["patroni"]:
    print(f"Patroni {n['name']}:                REST {n['rest']}  PostgreSQL 127.0.0.1:{n['port']}")
print(f"etcd:                      {', '.join(info['etcd'])}")
print(f"described in:              {d}/cluster.json")
EOF
