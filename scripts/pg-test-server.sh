#!/usr/bin/env bash
# A throw-away PostgreSQL server for tests, bound to 127.0.0.1 only, trust authentication.
#
#   pg-test-server.sh start DIR PORT   cluster in DIR/data, log in DIR/server.log, socket in DIR;
#                                      prints the superuser URL (postgresql://postgres@127.0.0.1:PORT/postgres)
#   pg-test-server.sh stop DIR         stop the server started with DIR (fast shutdown)
#
# PostgreSQL refuses to run as root: when run as root the server runs as the `postgres` user
# (installed with the `postgresql` Debian package, apt-get'ed here if the binaries are missing).
set -euo pipefail

usage() { echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2; }

bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$d" ] || [ ! -x "$d/initdb" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
      d=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    else
      echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2
      exit 1
    fi
  fi
  echo "$d"
}

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cmd=${1:-}; [ -n "$cmd" ] || usage
DIR=$(realpath -m "${2:-}"); [ -n "${2:-}" ] || usage
BIN=$(bindir)

case "$cmd" in
  stop)
    [ -f "$DIR/data/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null
    exit 0 ;;
  start)
    PORT=${3:-}; [ -n "$PORT" ] || usage
    mkdir -p "$DIR"
    if [ "$(id -u)" = 0 ]; then
      chown postgres:postgres "$DIR"
      # The server (user postgres) must be able to reach DIR.
      p=$DIR
      while [ "$p" != / ]; do p=$(dirname "$p"); chmod o+x "$p"; done
    fi
    [ -d "$DIR/data" ] || as_pg "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --no-locale >/dev/null
    # fsync stays on: the durability tests rely on what a real deployment does.
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
      -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
    echo "postgresql://postgres@127.0.0.1:$PORT/postgres" ;;
  *) usage ;;
esac
