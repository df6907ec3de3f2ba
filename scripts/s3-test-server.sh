#!/usr/bin/env bash
# A throw-away S3-compatible server for tests: OpenStack Swift (Debian packages)
# with its s3api middleware and tempauth, single node, bound to 127.0.0.1 only.
# A private memcached caches account/container info: without it every S3 request
# costs three extra backend round trips (~7x slower here).
#
#   s3-test-server.sh install          apt-get the Swift packages if missing (root; idempotent)
#   s3-test-server.sh start DIR PORT   configs and data under DIR; S3 on PORT, internal
#                                      object/container/account servers and memcached
#                                      on PORT+1..PORT+4
#   s3-test-server.sh stop DIR         stop what `start DIR` started
#
# Credentials (test only): access key "test:tester", secret "testing".
# Swift accepts Object Lock headers but does not enforce them.
set -euo pipefail

PACKAGES=(swift-proxy swift-object swift-container swift-account memcached)
SERVICES=(memcached object container account proxy)
# Debian's interpreter, which has Swift's modules (not a pyenv or venv python3 on PATH).
PY=/usr/bin/python3

usage() { echo "usage: $0 install | start DIR PORT | stop DIR" >&2; exit 2; }

have_swift() {
  local s
  for s in object container account proxy; do command -v "swift-$s-server" >/dev/null || return 1; done
  "$PY" -c "import swift.common.ring" 2>/dev/null && command -v memcached >/dev/null
}

install() {
  have_swift && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "Swift is not installed and installing it needs root: apt-get install ${PACKAGES[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d 101: the packages must not start system-wide Swift services.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null || { [ $created = 1 ] && rm -f "$policy"; exit 1; }
  [ $created = 1 ] && rm -f "$policy"
  have_swift
}

stop() {
  local dir=$1 s pids=()
  for s in "${SERVICES[@]}"; do
    [ -f "$dir/run/$s.pid" ] || continue
    pids+=("$(cat "$dir/run/$s.pid")")
    rm -f "$dir/run/$s.pid"
  done
  [ ${#pids[@]} = 0 ] && return 0
  kill "${pids[@]}" 2>/dev/null || true
  # Swift waits for idle keep-alive clients on SIGTERM; the data is disposable,
  # so after a short grace insist (a leftover would hold its port).
  local pid alive
  for _ in $(seq 1 10); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

write_configs() {
  local dir=$1 port=$2
  # Random hash path suffix per instance: nothing here is meant to be durable.
  cat > "$dir/swift.conf" <<EOF
[swift-hash]
swift_hash_path_suffix = fhirvault-test-$RANDOM$RANDOM
swift_hash_path_prefix = fhirvault-test
[storage-policy:0]
name = Policy-0
default = yes
EOF
  local name offset
  for name in object container account; do
    case $name in object) offset=1 ;; container) offset=2 ;; account) offset=3 ;; esac
    cat > "$dir/$name-server.conf" <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $((port + offset))
workers = 0
user = $(id -un)
swift_dir = $dir
devices = $dir/srv
mount_check = false
log_name = $name-server
log_address = /dev/null
log_level = WARNING
[pipeline:main]
pipeline = $name-server
[app:$name-server]
use = egg:swift#$name
[$name-replicator]
[$name-auditor]
[$name-updater]
[object-expirer]
EOF
  done
  cat > "$dir/proxy-server.conf" <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $port
workers = 0
user = $(id -un)
swift_dir = $dir
log_address = /dev/null
log_level = WARNING
[pipeline:main]
pipeline = catch_errors healthcheck gatekeeper proxy-logging cache listing_formats s3api tempauth copy slo dlo versioned_writes symlink proxy-logging proxy-server
[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$((port + 4))
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:s3api]
use = egg:swift#s3api
location = us-east-1
[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = testing .admin
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
[filter:versioned_writes]
use = egg:swift#versioned_writes
allow_object_versioning = true
[filter:symlink]
use = egg:swift#symlink
EOF
}

build_rings() {
  # One Python process for the three one-device rings (swift-ring-builder would take nine).
  "$PY" - "$1" "$2" <<'EOF'
import sys
from swift.common.ring import RingBuilder
directory, port = sys.argv[1], int(sys.argv[2])
for offset, name in enumerate(("object", "container", "account"), start=1):
    builder = RingBuilder(6, 1, 1)  # 2^6 partitions, 1 replica
    builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": port + offset,
                     "device": "d1", "weight": 100})
    builder.rebalance()
    builder.get_ring().save(f"{directory}/{name}.ring.gz")
EOF
}

answers() {
  # The healthcheck answers before s3api is usable, so probe S3 itself: a request
  # with a bogus S3 signature is refused with an S3 XML error once s3api is up.
  "$PY" - "$1" <<'EOF'
import email.utils, sys, urllib.error, urllib.request
headers = {"Authorization": "AWS probe:probe", "Date": email.utils.formatdate(usegmt=True)}
try:
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/", headers=headers), timeout=1)
except urllib.error.HTTPError as e:
    sys.exit(0 if b"<Error>" in e.read() else 1)
except OSError:
    sys.exit(1)
EOF
}

launch() {  # launch DIR NAME COMMAND...: in its own session, so the caller's signals do not half-kill the node
  local dir=$1 name=$2; shift 2
  setsid "$@" > "$dir/run/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/run/$name.pid"
}

start() {
  local dir port s deadline
  dir=$(realpath -m "$1"); port=$2
  have_swift || { echo "Swift is not installed: run '$0 install' first" >&2; exit 1; }
  stop "$dir"
  mkdir -p "$dir/srv/d1" "$dir/run"
  write_configs "$dir" "$port"
  local as_root=()
  [ "$(id -u)" = 0 ] && as_root=(-u root)  # memcached refuses root without it
  launch "$dir" memcached memcached -l 127.0.0.1 -p $((port + 4)) -U 0 -m 64 "${as_root[@]}"
  # The storage servers do not read the rings at start-up: build them meanwhile.
  for s in object container account; do launch "$dir" "$s" "$(command -v "swift-$s-server")" "$dir/$s-server.conf"; done
  build_rings "$dir" "$port" || { stop "$dir"; exit 1; }
  launch "$dir" proxy "$(command -v swift-proxy-server)" "$dir/proxy-server.conf"
  deadline=$((SECONDS + 60))  # generous: CI machines can be busy
  while [ $SECONDS -lt $deadline ]; do
    if answers "$port"; then
      echo "S3 endpoint http://127.0.0.1:$port (access key test:tester, secret testing)"
      return 0
    fi
    for s in "${SERVICES[@]}"; do
      kill -0 "$(cat "$dir/run/$s.pid")" 2>/dev/null && continue
      echo "$s exited; log follows" >&2; tail -20 "$dir/run/$s.log" >&2
      stop "$dir"; exit 1
    done
    sleep 0.1
  done
  echo "Swift did not answer on port $port within 60 s; logs in $dir/run" >&2
  stop "$dir"; exit 1
}

case ${1:-} in
  install) [ $# = 1 ] || usage; install ;;
  start) [ $# = 3 ] || usage; start "$2" "$3" ;;
  stop) [ $# = 2 ] || usage; stop "$(realpath -m "$2")" ;;
  *) usage ;;
esac
