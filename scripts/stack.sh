#!/usr/bin/env bash
# The compose stack's topology, natively on loopback: PostgreSQL, one vLLM OpenAI server as the engine,
# two moerge replicas on one pool, nginx in front of them, Prometheus scraping every part (with the nginx
# and postgres exporters). For tests, and for people without Docker (docs/deployment.md, "Native stack").
#
#   scripts/stack.sh install        apt-get the Debian packages (nginx, prometheus, the two exporters,
#                                   docker-compose for `docker-compose config`); stops any service they start
#   scripts/stack.sh start [DIR]    start everything on free loopback ports, print the URLs (default DIR:
#                                   runs/stack); DIR holds the config files, logs/, pids/ and stack.env
#   scripts/stack.sh status [DIR]   which processes are up, and the URLs
#   scripts/stack.sh stop [DIR]     end every process it started (each is its own process group)
#
# Each process runs in its own session (setsid), so `stop` ends it with all its children: TERM to the
# group, KILL after 20 s. PostgreSQL is scripts/pg_local.sh's throwaway cluster in DIR/pg.
#
# Settings (environment):
#   MOERGE_HOME           models folder the replicas share (default ~/.cache/moerge; `moerge assets` fills it)
#   STACK_EXECUTOR        the replicas' executor: servers (the vLLM server, when moerge has that executor)
#                         or reference (in-process transformers); default: servers if moerge supports it
#   STACK_MAX_LORAS       the vLLM server's --max-loras and the replicas' MOERGE_ENGINE_MAX_LORAS (default 4)
#   STACK_VLLM=0          do not start the vLLM server (the replicas must then use STACK_EXECUTOR=reference)
#   STACK_START_TIMEOUT_S how long to wait for every part to answer (default 900: vLLM's start on 2 cores)
#   other MOERGE_*        passed to both replicas (MOERGE_POOL_POLL_S, MOERGE_BUNDLED_POOL, MOERGE_ADMIN_KEY ...)
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
usage() { echo "usage: $0 install | start [DIR] | status [DIR] | stop [DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
cmd=$1
dir=$(realpath -m "${2:-$ROOT/runs/stack}")
PACKAGES=(nginx prometheus prometheus-nginx-exporter prometheus-postgres-exporter)
PARTS=(vllm replica-a replica-b nginx nginx-exporter postgres-exporter prometheus)

log() { echo "stack: $*" >&2; }
die() { log "error: $*"; exit 1; }

stop_default_services() {
  # The packages' own services (if a postinst started one) would hold their default ports and configs.
  local svc
  for svc in nginx prometheus prometheus-nginx-exporter prometheus-postgres-exporter; do
    if command -v service >/dev/null && service "$svc" status >/dev/null 2>&1; then
      log "stopping the package's default $svc service"
      service "$svc" stop >/dev/null 2>&1 || true
    fi
  done
}

stop_pg_service() {  # the package's own cluster is not the stack's; it would only hold port 5432
  if command -v service >/dev/null && service postgresql status >/dev/null 2>&1; then
    service postgresql stop >/dev/null 2>&1 || true
  fi
}

apt_install() {  # apt_install PACKAGE...: those not installed yet; 1 if apt-get fails
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  [ "$(id -u)" = 0 ] || { log "installing ${missing[*]} needs root (apt-get)"; return 1; }
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
}

install() {
  apt_install "${PACKAGES[@]}" || die "could not install ${PACKAGES[*]}"
  # the registry: scripts/pg_local.sh finds any installed PostgreSQL; Debian's default one otherwise
  if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null; then
    apt_install postgresql || die "could not install postgresql"
    stop_pg_service
  fi
  # only for checking docker-compose.yml (`docker-compose config` needs no daemon); the stack runs without it
  if ! { command -v docker >/dev/null && docker compose version >/dev/null 2>&1; }; then
    apt_install docker-compose || log "could not install docker-compose: the compose file check will be skipped"
  fi
  stop_default_services
}

free_ports() {  # N distinct free loopback ports (all bound at once, so none repeats)
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

render() {  # render TEMPLATE OUT KEY=VALUE...: ${KEY} replaced, everything else ($host ...) kept, as envsubst does
  python3 - "$@" <<'EOF'
import re, sys
template, out, *pairs = sys.argv[1:]
values = dict(p.split("=", 1) for p in pairs)
text = open(template).read()
missing = sorted(set(re.findall(r"\$\{([A-Z_]+)\}", text)) - set(values))
if missing:
    sys.exit(f"{template}: no value for {', '.join(missing)}")
open(out, "w").write(re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], text))
EOF
}

spawn() {  # spawn NAME CMD...: in its own session (process group = its pid), output to DIR/logs/NAME.log
  local name=$1; shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$dir/pids/$name.pid"
}

alive() { [ -f "$dir/pids/$1.pid" ] && kill -0 "$(cat "$dir/pids/$1.pid")" 2>/dev/null; }

wait_http() {  # wait_http NAME URL DEADLINE: until URL answers 200; fails if NAME's process ended
  local name=$1 url=$2 deadline=$3
  until curl -fsS -o /dev/null --max-time 3 "$url" 2>/dev/null; do
    if ! alive "$name"; then
      log "$name exited during start-up; the end of $dir/logs/$name.log:"
      tail -n 30 "$dir/logs/$name.log" >&2 || true
      return 1
    fi
    [ "$(date +%s)" -lt "$deadline" ] || { log "$name did not answer $url in time ($dir/logs/$name.log)"; return 1; }
    sleep 1
  done
}

moerge_supports_servers() { grep -q "engine_urls" "$ROOT/moerge/config.py"; }

start() {
  local t0 b
  t0=$(date +%s.%N)
  for b in "${PACKAGES[@]}" curl; do
    command -v "$b" >/dev/null || die "$b is not installed: run '$0 install' first"
  done
  [ -x "$ROOT/.venv/bin/moerge" ] || die "no .venv/bin/moerge: run 'make install' first"
  local executor=${STACK_EXECUTOR:-}
  if [ -z "$executor" ]; then
    if moerge_supports_servers && [ "${STACK_VLLM:-1}" != 0 ]; then executor=servers; else executor=reference; fi
  fi
  case "$executor" in
    servers) moerge_supports_servers || die "STACK_EXECUTOR=servers, but this moerge has no engine_urls setting";
             [ "${STACK_VLLM:-1}" != 0 ] || die "STACK_EXECUTOR=servers needs the vLLM server (STACK_VLLM=1)" ;;
    reference|vllm) ;;
    *) die "STACK_EXECUTOR must be servers, reference or vllm, not '$executor'" ;;
  esac
  local max_loras=${STACK_MAX_LORAS:-4}
  [[ "$max_loras" =~ ^[1-9][0-9]*$ ]] || die "STACK_MAX_LORAS must be a positive integer, not '$max_loras'"
  if [ -f "$dir/stack.env" ] && ls "$dir"/pids/*.pid >/dev/null 2>&1; then
    for b in "${PARTS[@]}"; do
      alive "$b" && die "a stack is already running in $dir: '$0 stop $dir' first"
    done
  fi
  if [ -f "$dir/pg/data/postmaster.pid" ] && kill -0 "$(head -n 1 "$dir/pg/data/postmaster.pid")" 2>/dev/null; then
    die "the PostgreSQL of a stack in $dir is still running: '$0 stop $dir' first"
  fi
  rm -rf "$dir/pids" "$dir/logs" "$dir/nginx" "$dir/prometheus" "$dir/pool" "$dir/pg"
  mkdir -p "$dir/pids" "$dir/logs" "$dir/nginx/tmp" "$dir/prometheus/targets" "$dir/pool"
  if [ "$(id -u)" = 0 ]; then
    # PostgreSQL runs as postgres and nginx's worker as www-data: both must reach their folders in DIR
    chmod 755 "$dir"
    runuser -u postgres -- test -x "$dir" \
      || die "the postgres user cannot reach $dir (a parent folder is closed to it): pick a DIR under /tmp"
  fi
  trap 'log "start failed: stopping what was started"; stop_all; exit 1' ERR

  local timeout_s=${STACK_START_TIMEOUT_S:-900}
  local deadline=$(( $(date +%s) + timeout_s ))

  local home=${MOERGE_HOME:-$HOME/.cache/moerge}
  MOERGE_HOME=$home "$ROOT/.venv/bin/moerge" assets >"$dir/logs/assets.log" 2>&1 \
    || { tail -n 20 "$dir/logs/assets.log" >&2; die "moerge assets failed"; }
  local base_model
  base_model=$(MOERGE_HOME=$home "$ROOT/.venv/bin/python" -c \
    'from moerge.config import get_settings; print(get_settings().base_model_dir)')

  local p_vllm p_a p_b p_lb p_status p_nginx_exp p_pg_exp p_prom
  read -r p_vllm p_a p_b p_lb p_status p_nginx_exp p_pg_exp p_prom <<<"$(free_ports 8)"
  local db_url
  db_url=$(bash "$ROOT/scripts/pg_local.sh" start "$dir/pg")
  local pg_port
  pg_port=$(cat "$dir/pg/port")

  # The engine first: it takes longest.
  if [ "${STACK_VLLM:-1}" != 0 ]; then
    # bounded oneDNN primitive caches, as moerge's own engine has them (Settings.vllm_onednn_cache;
    # docs/reliability.md: with the default 1024 the engine's memory climbs with every new batch shape)
    local cache="${MOERGE_VLLM_ONEDNN_CACHE:-16}"
    # bfloat16 only where this CPU has native bf16 (moerge/compute.py); float32 is ~4x faster elsewhere
    local dtype
    dtype="$("$ROOT/.venv/bin/python" -c 'from moerge.compute import resolve_dtype; print(resolve_dtype())')"
    spawn vllm env VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
      ONEDNN_PRIMITIVE_CACHE_CAPACITY="$cache" LRU_CACHE_CAPACITY="$cache" \
      "$ROOT/.venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$base_model" \
      --host 127.0.0.1 --port "$p_vllm" --max-model-len 1024 --dtype "$dtype" \
      --enable-lora --max-loras "$max_loras" --max-lora-rank 64 --enable-prompt-tokens-details
  fi

  # Two replicas on one pool: one registry database, one artifact folder, one models folder.
  local engine_env=()
  if [ "$executor" = servers ]; then
    engine_env=(MOERGE_ENGINE_URLS="[\"http://127.0.0.1:$p_vllm\"]" MOERGE_ENGINE_MAX_LORAS="$max_loras")
  fi
  local name port
  for name in a b; do
    [ "$name" = a ] && port=$p_a || port=$p_b
    spawn "replica-$name" env MOERGE_HOME="$home" MOERGE_POOL_DIR="$dir/pool" MOERGE_DATABASE_URL="$db_url" \
      MOERGE_HOST=127.0.0.1 MOERGE_PORT="$port" MOERGE_EXECUTOR="$executor" "${engine_env[@]}" \
      "$ROOT/.venv/bin/moerge" serve
  done

  # nginx: our own main config (pid, logs, temp files in DIR), the shared server blocks included.
  render "$ROOT/deploy/nginx/moerge.conf.template" "$dir/nginx/moerge.conf" \
    NGINX_LISTEN="127.0.0.1:$p_lb" NGINX_STATUS_LISTEN="127.0.0.1:$p_status" \
    MOERGE_REPLICA_A="127.0.0.1:$p_a" MOERGE_REPLICA_B="127.0.0.1:$p_b"
  local user_line=""
  if [ "$(id -u)" = 0 ]; then
    user_line="user www-data;"
    chown www-data: "$dir/nginx/tmp"
  fi
  cat >"$dir/nginx/nginx.conf" <<EOF
# written by scripts/stack.sh; the server blocks are deploy/nginx/moerge.conf.template
$user_line
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log $dir/logs/nginx-error.log info;
events { worker_connections 1024; }
http {
    access_log $dir/logs/nginx-access.log;
    client_body_temp_path $dir/nginx/tmp/body;
    proxy_temp_path $dir/nginx/tmp/proxy;
    fastcgi_temp_path $dir/nginx/tmp/fastcgi;
    uwsgi_temp_path $dir/nginx/tmp/uwsgi;
    scgi_temp_path $dir/nginx/tmp/scgi;
    default_type application/octet-stream;
    include $dir/nginx/moerge.conf;
}
EOF
  nginx -t -q -c "$dir/nginx/nginx.conf" -p "$dir/nginx" 2>"$dir/logs/nginx-test.log" \
    || { cat "$dir/logs/nginx-test.log" >&2; die "nginx refused its config"; }
  spawn nginx nginx -c "$dir/nginx/nginx.conf" -p "$dir/nginx" -g "daemon off;"
  # the nginx exporter (0.11) exits at once if stub_status does not answer yet
  wait_http nginx "http://127.0.0.1:$p_status/stub_status" "$deadline"
  spawn nginx-exporter prometheus-nginx-exporter -nginx.scrape-uri "http://127.0.0.1:$p_status/stub_status" \
    -web.listen-address "127.0.0.1:$p_nginx_exp"
  spawn postgres-exporter env DATA_SOURCE_NAME="postgresql://moerge@127.0.0.1:$pg_port/moerge?sslmode=disable" \
    prometheus-postgres-exporter --web.listen-address="127.0.0.1:$p_pg_exp"

  # Prometheus: the shared config, this stack's targets.
  cp "$ROOT/deploy/prometheus/prometheus.yml" "$dir/prometheus/prometheus.yml"
  local t="$dir/prometheus/targets"
  echo "[{\"targets\": [\"127.0.0.1:$p_a\"], \"labels\": {\"replica\": \"a\"}}, {\"targets\": [\"127.0.0.1:$p_b\"], \"labels\": {\"replica\": \"b\"}}]" >"$t/moerge.json"
  if [ "${STACK_VLLM:-1}" != 0 ]; then
    echo "[{\"targets\": [\"127.0.0.1:$p_vllm\"], \"labels\": {\"engine\": \"0\"}}]" >"$t/vllm.json"
  else
    echo "[]" >"$t/vllm.json"
  fi
  echo "[{\"targets\": [\"127.0.0.1:$p_nginx_exp\"]}]" >"$t/nginx.json"
  echo "[{\"targets\": [\"127.0.0.1:$p_pg_exp\"]}]" >"$t/postgres.json"
  echo "[{\"targets\": [\"127.0.0.1:$p_prom\"]}]" >"$t/prometheus.json"
  spawn prometheus prometheus --config.file="$dir/prometheus/prometheus.yml" \
    --storage.tsdb.path="$dir/prometheus/data" --web.listen-address="127.0.0.1:$p_prom"

  cat >"$dir/stack.env" <<EOF
STACK_DIR=$dir
STACK_EXECUTOR=$executor
STACK_MAX_LORAS=$max_loras
BALANCER_URL=http://127.0.0.1:$p_lb
REPLICA_A_URL=http://127.0.0.1:$p_a
REPLICA_B_URL=http://127.0.0.1:$p_b
VLLM_URL=$( [ "${STACK_VLLM:-1}" != 0 ] && echo "http://127.0.0.1:$p_vllm" )
PROMETHEUS_URL=http://127.0.0.1:$p_prom
NGINX_STATUS_URL=http://127.0.0.1:$p_status/stub_status
NGINX_EXPORTER_URL=http://127.0.0.1:$p_nginx_exp/metrics
POSTGRES_EXPORTER_URL=http://127.0.0.1:$p_pg_exp/metrics
DATABASE_URL=$db_url
POOL_DIR=$dir/pool
POOL_POLL_S=${MOERGE_POOL_POLL_S:-1}
EOF

  wait_http prometheus "http://127.0.0.1:$p_prom/-/ready" "$deadline"
  wait_http nginx-exporter "http://127.0.0.1:$p_nginx_exp/metrics" "$deadline"
  wait_http postgres-exporter "http://127.0.0.1:$p_pg_exp/metrics" "$deadline"
  wait_http replica-a "http://127.0.0.1:$p_a/readyz" "$deadline"
  wait_http replica-b "http://127.0.0.1:$p_b/readyz" "$deadline"
  wait_http nginx "http://127.0.0.1:$p_lb/readyz" "$deadline"
  [ "${STACK_VLLM:-1}" = 0 ] || wait_http vllm "http://127.0.0.1:$p_vllm/v1/models" "$deadline"
  trap - ERR
  local took
  took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.0f}')" "$t0" "$(date +%s.%N)")
  echo "STACK_START_S=$took" >>"$dir/stack.env"
  log "up in ${took} s (executor: $executor); logs in $dir/logs"
  urls
}

urls() {
  [ -f "$dir/stack.env" ] || die "no stack in $dir"
  # shellcheck disable=SC1091
  . "$dir/stack.env"
  cat <<EOF
balancer (OpenAI API)  $BALANCER_URL/v1
replica a              $REPLICA_A_URL
replica b              $REPLICA_B_URL
vLLM engine            ${VLLM_URL:-(not started)}
prometheus             $PROMETHEUS_URL
nginx exporter         $NGINX_EXPORTER_URL
postgres exporter      $POSTGRES_EXPORTER_URL
registry               $DATABASE_URL
pool folder            $POOL_DIR
EOF
}

status() {
  [ -d "$dir/pids" ] || die "no stack in $dir"
  local part
  for part in "${PARTS[@]}"; do
    if [ ! -f "$dir/pids/$part.pid" ]; then printf '%-18s not started\n' "$part"
    elif alive "$part"; then printf '%-18s up (pid %s)\n' "$part" "$(cat "$dir/pids/$part.pid")"
    else printf '%-18s down\n' "$part"; fi
  done
  if bash "$ROOT/scripts/pg_local.sh" url "$dir/pg" >/dev/null 2>&1 && [ -f "$dir/pg/data/postmaster.pid" ]; then
    printf '%-18s up (pid %s)\n' postgresql "$(head -n 1 "$dir/pg/data/postmaster.pid")"
  else
    printf '%-18s down\n' postgresql
  fi
  urls
}

stop_all() {
  local part pid waited
  for part in "${PARTS[@]}"; do
    [ -f "$dir/pids/$part.pid" ] || continue
    pid=$(cat "$dir/pids/$part.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for part in "${PARTS[@]}"; do
    [ -f "$dir/pids/$part.pid" ] || continue
    pid=$(cat "$dir/pids/$part.pid")
    waited=0
    while kill -0 -- "-$pid" 2>/dev/null && [ "$waited" -lt 200 ]; do sleep 0.1; waited=$((waited + 1)); done
    if kill -0 -- "-$pid" 2>/dev/null; then
      log "$part did not end on TERM within 20 s: KILL"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$dir/pids/$part.pid"
  done
  [ -d "$dir/pg" ] && bash "$ROOT/scripts/pg_local.sh" stop "$dir/pg" || true
}

case "$cmd" in
  install) install ;;
  start) start ;;
  status) status ;;
  stop) [ -d "$dir" ] || die "no stack in $dir"; stop_all; log "stopped" ;;
  *) usage ;;
esac
