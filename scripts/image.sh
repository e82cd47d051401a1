#!/usr/bin/env bash
# Build moerge's image (./Dockerfile) with podman, which needs no daemon, and run it the way the compose stack
# does: one container as the vLLM OpenAI server, one as a moerge replica using it (executor "servers").
#
#   scripts/image.sh build        build localhost/moerge:0.1.0
#   scripts/image.sh smoke        start both containers, wait for /readyz, chat through the replica,
#                                 run the image's HEALTHCHECK, stop them (exit 0 only if all of it worked)
#   scripts/image.sh stop         remove the smoke containers
#
# Environment:
#   MOERGE_IMAGE_BASE   the Python 3.11 bookworm base image (default python:3.11.14-slim-bookworm). Where no
#                       registry is reachable, `scripts/image.sh base` makes one with debootstrap from the
#                       Debian mirror (python3 3.11 from bookworm) and tags it localhost/python:3.11-bookworm-debootstrap.
#   MOERGE_IMAGE_WHEELS a folder of wheels mounted at build time (pip --find-links), e.g. where torch's CPU
#                       index is not reachable but its wheel is at hand
#   MOERGE_IMAGE_CA     a CA bundle mounted at build time and given to pip (a TLS-inspecting proxy)
#   MOERGE_IMAGE_TORCH_INDEX  torch's CPU wheel index or a mirror (default: the Dockerfile's)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${MOERGE_IMAGE:-localhost/moerge:0.1.0}
BASE=${MOERGE_IMAGE_BASE:-python:3.11.14-slim-bookworm}
VLLM_PORT=${MOERGE_IMAGE_VLLM_PORT:-8291}
API_PORT=${MOERGE_IMAGE_API_PORT:-8290}
LOG=runs/image
mkdir -p "$LOG"

need_podman() {
    command -v podman >/dev/null || { echo "podman is not installed: apt-get install -y podman runc" >&2; exit 2; }
}

base() {
    need_podman
    command -v debootstrap >/dev/null || { echo "debootstrap is not installed: apt-get install -y debootstrap" >&2; exit 2; }
    local root
    root=$(mktemp -d /var/tmp/moerge-base.XXXXXX)
    echo "debootstrap bookworm (python3, python3-venv) into $root ..."
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian > "$LOG/debootstrap.log" 2>&1
    rm -f "$root"/var/cache/apt/archives/*.deb
    rm -rf "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import --change 'CMD ["python3"]' - localhost/python:3.11-bookworm-debootstrap
    rm -rf "$root"
    echo "base image: localhost/python:3.11-bookworm-debootstrap"
}

build() {
    need_podman
    local args=(--format docker --network host --build-arg "PYTHON_IMAGE=$BASE" -t "$IMAGE")
    if [ -n "${MOERGE_IMAGE_WHEELS:-}" ]; then
        args+=(-v "$MOERGE_IMAGE_WHEELS:/opt/wheels:ro" --build-arg PIP_FIND_LINKS=/opt/wheels)
    fi
    if [ -n "${MOERGE_IMAGE_CA:-}" ]; then
        args+=(-v "$MOERGE_IMAGE_CA:/etc/ssl/certs/ca-certificates.crt:ro"
               --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
    fi
    if [ -n "${MOERGE_IMAGE_TORCH_INDEX:-}" ]; then
        args+=(--build-arg "TORCH_INDEX_URL=$MOERGE_IMAGE_TORCH_INDEX")
    fi
    echo "podman build ${args[*]} ."
    podman build "${args[@]}" .
    podman image inspect "$IMAGE" --format 'built {{.Id}} {{.Size}} bytes, user {{.Config.User}}'
}

wait_url() {   # url, seconds, what
    local deadline=$((SECONDS + $2))
    until python3 -c "import urllib.request as u; u.urlopen('$1', timeout=3)" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then echo "$3: no answer from $1 within $2 s" >&2; return 1; fi
        sleep 3
    done
    echo "$3 ready after $((SECONDS - START)) s"
}

stop() {
    podman rm -f moerge-smoke-api moerge-smoke-vllm >/dev/null 2>&1 || true
}

smoke() {
    need_podman
    stop
    START=$SECONDS
    podman volume create moerge-smoke-data >/dev/null 2>&1 || true
    podman volume create moerge-smoke-pool >/dev/null 2>&1 || true
    # the models first (the compose stack's `assets` service): the image's entrypoint runs `moerge assets`
    podman run --rm -v moerge-smoke-data:/data "$IMAGE" true
    echo "assets prepared after $((SECONDS - START)) s"
    # the engine: the compose stack's `vllm` service, in the dtype this CPU runs fastest (moerge/compute.py)
    local dtype
    dtype="$(podman run --rm --entrypoint python "$IMAGE" -c 'from moerge.compute import resolve_dtype; print(resolve_dtype())')"
    # vLLM's engine needs more shared memory than the 64 MB a container gets by default (160 MiB here)
    podman run -d --name moerge-smoke-vllm --network host --shm-size 1g \
        -e VLLM_ALLOW_RUNTIME_LORA_UPDATING=True -e VLLM_CPU_KVCACHE_SPACE=2 \
        -e ONEDNN_PRIMITIVE_CACHE_CAPACITY=16 -e LRU_CACHE_CAPACITY=16 \
        -v moerge-smoke-data:/data:ro -v moerge-smoke-pool:/pool:ro \
        --entrypoint python "$IMAGE" -m vllm.entrypoints.openai.api_server \
        --model /data/models/SmolLM2-135M-Instruct --host 127.0.0.1 --port "$VLLM_PORT" \
        --max-model-len 1024 --dtype "$dtype" --enable-lora --max-loras 4 --max-lora-rank 64 \
        --enable-prompt-tokens-details >/dev/null
    # a replica: the compose stack's moerge-a, on SQLite in the pool volume
    podman run -d --name moerge-smoke-api --network host --shm-size 1g \
        -e MOERGE_PORT="$API_PORT" -e MOERGE_HOST=127.0.0.1 -e MOERGE_POOL_DIR=/pool \
        -e MOERGE_EXECUTOR=servers -e "MOERGE_ENGINE_URLS=[\"http://127.0.0.1:$VLLM_PORT\"]" \
        -e MOERGE_ENGINE_MAX_LORAS=4 \
        -v moerge-smoke-data:/data -v moerge-smoke-pool:/pool "$IMAGE" >/dev/null
    wait_url "http://127.0.0.1:$VLLM_PORT/health" 900 "vllm container" \
        || { podman logs --tail 40 moerge-smoke-vllm; stop; exit 1; }
    wait_url "http://127.0.0.1:$API_PORT/readyz" 900 "moerge container" \
        || { podman logs --tail 40 moerge-smoke-api; stop; exit 1; }
    python3 - "$API_PORT" <<'EOF'
import json, sys, urllib.request as u
port = sys.argv[1]
body = json.dumps({"model": "arith_add", "messages": [{"role": "user", "content": "What is 345 + 210?"}],
                   "max_tokens": 12, "temperature": 0}).encode()
req = u.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
out = json.load(u.urlopen(req, timeout=300))
text = out["choices"][0]["message"]["content"]
print("chat via the replica container:", repr(text), out.get("moerge", {}).get("plan", out.get("routing", "")))
assert "555" in text, f"arith_add answered {text!r}, not 555"
experts = json.load(u.urlopen(f"http://127.0.0.1:{port}/v1/experts", timeout=30))
n = len(experts.get("data", experts)) if isinstance(experts, dict) else len(experts)
print("experts in the container's pool:", n)
assert n >= 12
EOF
    podman healthcheck run moerge-smoke-api && echo "HEALTHCHECK of the replica container: healthy"
    podman exec moerge-smoke-api id -u | grep -qx 10001 && echo "the replica runs as uid 10001 (non-root)"
    stop
    echo "smoke test passed in $((SECONDS - START)) s"
}

case "${1:-}" in
    base) base ;;
    build) build ;;
    smoke) smoke ;;
    stop) stop ;;
    *) echo "usage: $0 base|build|smoke|stop" >&2; exit 2 ;;
esac
