#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on loopback, for tests and for running several replicas on one machine.
#
#   scripts/pg_local.sh start DIR [PORT]   initdb DIR/data (once), start it on 127.0.0.1:PORT (default: a
#                                          free port, kept in DIR/port), print its SQLAlchemy URL
#   scripts/pg_local.sh url DIR            print the URL of the cluster in DIR
#   scripts/pg_local.sh stop DIR           stop it (the data stays in DIR)
#
# The superuser is `moerge`, trusted on loopback only; the database is `moerge`. fsync is off: the
# cluster is for tests, not for data that must survive a power cut. Run as root, the server runs as the
# `postgres` user (PostgreSQL refuses root) and DIR is given to it. The binaries come from $PG_BIN, else
# the newest /usr/lib/postgresql/*/bin, else pg_config or the PATH. Exit 3: PostgreSQL is not installed.
set -euo pipefail

usage() { echo "usage: $0 start DIR [PORT] | url DIR | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
port_arg=${3:-}

find_bin() {
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
  if command -v initdb >/dev/null; then dirname "$(command -v initdb)"; return; fi
  echo "PostgreSQL is not installed: no initdb in \$PG_BIN, /usr/lib/postgresql/*/bin, pg_config --bindir or the PATH (Debian: apt-get install postgresql)" >&2
  exit 3
}

as_owner() {  # run a PostgreSQL binary as the user that owns the cluster
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

url() {
  [ -f "$dir/port" ] || { echo "no cluster started in $dir" >&2; exit 1; }
  echo "postgresql+psycopg://moerge@127.0.0.1:$(cat "$dir/port")/moerge"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$cmd" in
  start)
    bin=$(find_bin)
    if [ "$(id -u)" = 0 ]; then
      id postgres >/dev/null 2>&1 || { echo "running as root needs a 'postgres' user to run the server as" >&2; exit 3; }
    fi
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir" && chmod 700 "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_owner "$bin/initdb" -D "$dir/data" -U moerge -A trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then url; exit 0; fi
    port=${port_arg:-$(cat "$dir/port" 2>/dev/null || free_port)}
    as_owner sh -c "echo $port > '$dir/port'"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off" start >/dev/null \
      || { tail -n 20 "$dir/server.log" >&2; exit 1; }
    if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U moerge -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'moerge'" | grep -q 1; then
      "$bin/createdb" -h 127.0.0.1 -p "$port" -U moerge moerge
    fi
    url
    ;;
  url)
    url
    ;;
  stop)
    bin=$(find_bin)
    if [ -f "$dir/data/PG_VERSION" ] && as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
      as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
    ;;
  *)
    usage
    ;;
esac
