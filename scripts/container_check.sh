#!/usr/bin/env bash
# End-to-end check of the CPU container image (docker/Dockerfile.cpu) on this machine, with
# podman + runc and no container registry: build, serve a small VLM, ask it an image question.
#
#   bash scripts/container_check.sh            # all stages; exit non-zero on any failure
#   bash scripts/container_check.sh --keep     # leave the container running at the end
#
# Stages (each timed; the timings are printed at the end, also after a failure):
#   1. base     a Debian bookworm + Python 3.11 image made with debootstrap (`python:3.11-slim`'s
#               role, no registry here: python3, venv, headers (torch inductor compiles against
#               Python.h), CA certificates), imported into podman; skipped when the image exists.
#               The rootfs tarball is cached, so a wiped podman store re-imports it in seconds.
#   2. image    `podman build -f docker/Dockerfile.cpu` FROM that base, with the local
#               torch-2.13.0+cpu wheel as the `wheels` build context and the host's CA bundle
#               as a build secret (pip's only way through a TLS-intercepting egress proxy).
#   3. model    the proxy VLM trained in this repository, rebuilt from scripts/assets/proxy_vlm
#               into the cache (not models/, which others use), and a request built from
#               madakv_eval.proxy_tasks (8 images, a code hidden in one of them).
#   4. run      `podman run --runtime runc`, model mounted read-only, port published on
#               127.0.0.1 (MADAKV_NETWORK=host: the host's network instead); waits for /health.
#   5. request  POST /v1/chat/completions (images as base64 PNG data URLs), twice: policy `full`
#               (HTTP 200, the expected answer) and the server default, madakv @ 0.2 (HTTP 200,
#               a non-empty answer, and a "madakv compressed" line in the container's log);
#               GET /metrics (HTTP 200, vLLM's KV-cache gauge and madakv:kv_pages_freed_total > 0).
#   6. cleanup  stop and remove the container (also on failure, unless --keep).
#
# Environment knobs:
#   MADAKV_CONTAINER_CACHE=/var/tmp/madakv-containers   rootfs tarball, model, request files
#   MADAKV_BASE_IMAGE=localhost/madakv-base:bookworm-py311
#   MADAKV_IMAGE=localhost/madakv-vllm:cpu
#   MADAKV_WHEELS=/opt/wheels        directory holding torch-2.13.0+cpu-cp311-*.whl
#   MADAKV_DEBIAN_MIRROR=http://deb.debian.org/debian
#   MADAKV_PORT=18000                host port (127.0.0.1) mapped to the container's 8000
#   MADAKV_NETWORK=publish|host      how the server is reached (default publish)
#   MADAKV_BUILD_NETWORK=host        podman build --network (default: podman's own; pip and apt
#                                    reach the registries from it here, given the CA bundle)
#   MADAKV_REBUILD_BASE=1            redo debootstrap even if the tarball/image exist
#   MADAKV_NO_CACHE=1                podman build --no-cache
#   CONTAINER_RUNTIME=runc           OCI runtime (crun fails here: setrlimit RLIMIT_NOFILE; runc
#                                    needs the --ulimit values set below)
#   MADAKV_SERVE_ARGS="--enforce-eager"   extra `vllm serve` arguments (default none: the image's
#                                    defaults, torch inductor compiling the model at startup)
#   MADAKV_PYTHON=<repo>/.venv/bin/python   host interpreter for stage 3 (bash scripts/setup.sh)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MADAKV_CONTAINER_CACHE:-/var/tmp/madakv-containers}"
BASE_IMAGE="${MADAKV_BASE_IMAGE:-localhost/madakv-base:bookworm-py311}"
IMAGE="${MADAKV_IMAGE:-localhost/madakv-vllm:cpu}"
WHEELS="${MADAKV_WHEELS:-/opt/wheels}"
MIRROR="${MADAKV_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PORT="${MADAKV_PORT:-18000}"
NETWORK="${MADAKV_NETWORK:-publish}"
BUILD_NETWORK="${MADAKV_BUILD_NETWORK:-}"
RUNTIME="${CONTAINER_RUNTIME:-runc}"
HOST_PY="${MADAKV_PYTHON:-$REPO/.venv/bin/python}"
CONTAINER="madakv-check-$$"
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,40p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "container_check.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

T0=$(date +%s.%N)
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '[container_check %6ss] %s\n' "$(secs "$T0" "$(now)")" "$*"; }
STAGES=()
STAGE=""
STAGE_T=""
begin() { STAGE="$1"; STAGE_T=$(now); log "== $1: $2"; }
end() { STAGES+=("$(printf '%-8s %7ss  %s' "$STAGE" "$(secs "$STAGE_T" "$(now)")" "$1")"); STAGE=""; }
STARTED=0
finish() {
  local rc=$?
  if [ -n "$STAGE" ]; then STAGES+=("$(printf '%-8s %7ss  FAILED' "$STAGE" "$(secs "$STAGE_T" "$(now)")")"); fi
  if [ "$STARTED" = 1 ]; then
    if [ "$rc" != 0 ]; then
      log "container log (last 40 lines):"
      podman logs --tail 40 "$CONTAINER" 2>&1 | sed 's/^/    /' || true
    fi
    if [ "$KEEP" = 1 ]; then
      log "--keep: container $CONTAINER left running (podman rm -f $CONTAINER)"
    else
      local t; t=$(now)
      podman --runtime "$RUNTIME" rm -f -t 10 "$CONTAINER" >/dev/null 2>&1 || true
      [ "$rc" != 0 ] && STAGES+=("$(printf '%-8s %7ss  container removed after the failure' cleanup "$(secs "$t" "$(now)")")")
    fi
  fi
  echo
  echo "stage timings:"
  for s in "${STAGES[@]}"; do echo "  $s"; done
  printf '  %-8s %7ss\n' total "$(secs "$T0" "$(now)")"
  if [ "$rc" = 0 ]; then echo "container_check: PASS"; else echo "container_check: FAIL (rc=$rc)"; fi
  exit "$rc"
}
trap finish EXIT
die() { log "ERROR: $*"; exit 1; }

command -v podman >/dev/null || die "podman not found (apt-get install -y podman runc debootstrap)"
command -v "$RUNTIME" >/dev/null || die "OCI runtime $RUNTIME not found (apt-get install -y $RUNTIME)"
[ -x "$HOST_PY" ] || die "$HOST_PY missing: run bash scripts/setup.sh first"
mkdir -p "$CACHE"
PODMAN=(nice -n 19 podman --runtime "$RUNTIME")
# podman asks the runtime for nofile/nproc limits of 1048576 (its defaults as root), which this
# VM refuses ("error setting rlimit type 7/6: operation not permitted"): ask for the shell's hard
# nofile limit and at most 32768 processes instead (higher nproc values fail here too).
NOFILE="$(ulimit -Hn)"; NPROC="$(ulimit -Hu)"
[ "$NOFILE" = unlimited ] && NOFILE=1048576
{ [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; } && NPROC=32768
RUN_LIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

# ------------------------------------------------------------------------------------ 1. base
begin base "$BASE_IMAGE"
TARBALL="$CACHE/debian-bookworm-py311.tar"
if [ "${MADAKV_REBUILD_BASE:-0}" != 1 ] && podman image exists "$BASE_IMAGE"; then
  end "present in podman's store: skipped"
else
  if [ "${MADAKV_REBUILD_BASE:-0}" = 1 ] || [ ! -s "$TARBALL" ]; then
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install -y debootstrap)"
    ROOTFS="$CACHE/rootfs.tmp"
    rm -rf "$ROOTFS"
    log "debootstrap --variant=minbase bookworm from $MIRROR (a few minutes)"
    nice -n 19 debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
      bookworm "$ROOTFS" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    # Like the official Debian images: updates + security suites, no apt lists or caches.
    cat > "$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$ROOTFS"
  else
    log "reusing the cached rootfs $TARBALL"
  fi
  OLD_BASE="$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)"
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
    "$TARBALL" "$BASE_IMAGE" >/dev/null
  PYV="$(podman --runtime "$RUNTIME" run --rm "${RUN_LIMITS[@]}" "$BASE_IMAGE" python3 --version)" \
    || die "the base image does not run (python3 --version)"
  if [ -n "$OLD_BASE" ] && [ "$OLD_BASE" != "$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE")" ]; then
    podman rmi "$OLD_BASE" >/dev/null 2>&1 || true  # fails while images built on it remain
  fi
  end "imported ($(du -h "$TARBALL" | cut -f1) rootfs tarball; $PYV)"
fi

# ------------------------------------------------------------------------------------ 2. image
begin image "podman build -f docker/Dockerfile.cpu -> $IMAGE"
TORCH_WHEEL="$(compgen -G "$WHEELS/torch-2.13.0+cpu-cp311-*.whl" | head -1 || true)"
[ -n "$TORCH_WHEEL" ] || die "no torch-2.13.0+cpu-cp311 wheel in $WHEELS (MADAKV_WHEELS=dir)"
# --format docker: podman's default OCI format drops the Dockerfile's SHELL (bash -o pipefail).
BUILD_ARGS=(--format docker --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-context "wheels=$WHEELS"
            --build-arg "TORCH_INDEX_URL=")
[ -n "$BUILD_NETWORK" ] && BUILD_ARGS+=(--network "$BUILD_NETWORK")
for ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
  if [ -s "$ca" ]; then BUILD_ARGS+=(--secret "id=pip_ca,src=$ca"); break; fi
done
[ "${MADAKV_NO_CACHE:-0}" = 1 ] && BUILD_ARGS+=(--no-cache)
OLD_ID="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
( cd "$REPO" && "${PODMAN[@]}" build -f docker/Dockerfile.cpu "${BUILD_ARGS[@]}" -t "$IMAGE" . ) \
  > "$CACHE/build.log" 2>&1 || { tail -40 "$CACHE/build.log"; die "podman build failed (log: $CACHE/build.log)"; }
grep -E '^\[setup' "$CACHE/build.log" | sed 's/^/    /' || true
SIZE="$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.2f GB", $1 / 1e9 }')"
# A rebuild leaves the previous image untagged (~3 GB): remove it (not if something still uses it).
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
  podman rmi "$OLD_ID" >/dev/null 2>&1 && log "removed the previous, now untagged image ${OLD_ID:0:12}" || true
fi
end "built, $SIZE (log: $CACHE/build.log)"

# ------------------------------------------------------------------------------------ 3. model
begin model "proxy VLM + request bodies under $CACHE"
MODEL="$CACHE/proxy-vlm"
if [ ! -s "$MODEL/model.safetensors" ] || [ ! -s "$MODEL/madakv_proxy_vlm.json" ]; then
  ( cd "$REPO" && nice -n 19 "$HOST_PY" -c 'import sys; from madakv_eval.proxy_tasks import rebuild_proxy_model as r; r(sys.argv[1], "scripts/assets/proxy_vlm")' "$MODEL" ) \
    || die "rebuilding the proxy VLM failed"
  note="rebuilt from scripts/assets/proxy_vlm"
else
  note="reused"
fi
chmod -R a+rX "$MODEL"  # the image serves as an unprivileged user
( cd "$REPO" && "$HOST_PY" - "$CACHE" <<'EOF' ) || die "building the request failed"
import json, sys
from pathlib import Path
from madakv_eval import proxy_tasks as pt
from madakv_eval.demo import proxy_messages  # text and images interleaved, answer continued
cache = Path(sys.argv[1])
sample = pt.make_sample("text_needle", 7, 8)
k = pt.CODE_LEN["text_needle"]
def body(**extra):
    return {"model": "/model", "messages": proxy_messages(sample), "max_tokens": 1 + k,
            "temperature": 0, "continue_final_message": True, "add_generation_prompt": False, **extra}
(cache / "request-full.json").write_text(json.dumps(body(vllm_xargs={"madakv_policy": "full"})))
(cache / "request-default.json").write_text(json.dumps(body()))
(cache / "expected.txt").write_text(" ".join(sample.answer))
logcfg = {"version": 1, "disable_existing_loggers": False,
          "formatters": {"plain": {"format": "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"}},
          "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain", "level": "DEBUG",
                               "stream": "ext://sys.stdout"}},
          "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
                      "vllm.madakv": {"level": "DEBUG"}}}
(cache / "logging.json").write_text(json.dumps(logcfg))
EOF
chmod a+r "$CACHE/logging.json"
end "$note; request: 8 images, expected answer '$(cat "$CACHE/expected.txt")'"

# ------------------------------------------------------------------------------------ 4. run
begin run "podman run --runtime $RUNTIME $IMAGE /model (network: $NETWORK)"
if [ "$NETWORK" = host ]; then
  NET_ARGS=(--network host); SERVE_ARGS=(--host 127.0.0.1 --port "$PORT")
else
  NET_ARGS=(-p "127.0.0.1:$PORT:8000"); SERVE_ARGS=()
fi
URL="http://127.0.0.1:$PORT"
read -r -a EXTRA_SERVE_ARGS <<< "${MADAKV_SERVE_ARGS:-}"
if curl -s -o /dev/null --max-time 2 "$URL/health"; then die "something already answers on $URL (MADAKV_PORT=...)"; fi
STARTED=1
nice -n 19 podman --runtime "$RUNTIME" run -d --name "$CONTAINER" "${RUN_LIMITS[@]}" "${NET_ARGS[@]}" --shm-size 1g \
  -v "$MODEL:/model:ro" -v "$CACHE/logging.json:/etc/madakv-logging.json:ro" \
  -e VLLM_CPU_KVCACHE_SPACE=1 -e VLLM_LOGGING_CONFIG_PATH=/etc/madakv-logging.json \
  "$IMAGE" /model "${SERVE_ARGS[@]}" --max-model-len 4096 --limit-mm-per-prompt '{"image": 8}' \
  "${EXTRA_SERVE_ARGS[@]}" >/dev/null || die "podman run failed"
deadline=$(( $(date +%s) + ${MADAKV_START_TIMEOUT:-420} ))
until curl -sf -o /dev/null --max-time 2 "$URL/health"; do
  state="$(podman inspect --format '{{.State.Status}}' "$CONTAINER" 2>/dev/null || echo gone)"
  [ "$state" = running ] || die "container is $state before answering /health"
  [ "$(date +%s)" -lt "$deadline" ] || die "no /health answer within ${MADAKV_START_TIMEOUT:-420}s"
  sleep 2
done
end "serving on $URL ($(podman logs "$CONTAINER" 2>&1 | grep -c 'madakv:' || true) madakv startup log lines)"

# ------------------------------------------------------------------------------------ 5. request
begin request "POST /v1/chat/completions, GET /metrics"
"$HOST_PY" - "$URL" "$CACHE" <<'EOF' || die "request checks failed"
import json, sys, time, urllib.error, urllib.request
from pathlib import Path
url, cache = sys.argv[1], Path(sys.argv[2])
expected = (cache / "expected.txt").read_text()
def post(name):
    body = (cache / name).read_bytes()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t = time.time()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, data = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        sys.exit(f"{name}: HTTP {e.code}: {e.read()[:500]!r}")
    answer = data["choices"][0]["message"]["content"] or ""
    words = " ".join(answer.lstrip(": ").split())
    n_img = sum(1 for p in json.loads(body)["messages"][0]["content"] if p["type"] == "image_url")
    print(f"    {name}: HTTP {status}, {n_img} images, {data['usage']['prompt_tokens']} prompt tokens, "
          f"{time.time() - t:.2f}s, answer {words!r}")
    return status, words
status, full = post("request-full.json")
assert status == 200, status
assert full == expected, f"full cache answered {full!r}, expected {expected!r}"
status, default = post("request-default.json")
assert status == 200 and default, f"default policy: HTTP {status}, answer {default!r}"
print(f"    expected {expected!r}: full cache {'right' if full == expected else 'WRONG'}, "
      f"madakv @ 0.2 {'right' if default == expected else 'wrong (lossy budget; only non-empty is required)'}")
with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
    status, text = r.status, r.read().decode()
gauge = [l for l in text.splitlines() if l.startswith("vllm:kv_cache_usage_perc")]
assert status == 200 and gauge, f"/metrics: HTTP {status}, no vllm:kv_cache_usage_perc"
done = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("vllm:request_success_total"))
print(f"    /metrics: HTTP 200, {len(text.splitlines())} lines, {gauge[0]}, vllm:request_success_total {done:g}")
freed = [l for l in text.splitlines() if l.startswith("madakv:kv_pages_freed_total")]
assert freed and float(freed[0].rsplit(" ", 1)[1]) > 0, "/metrics: no madakv:kv_pages_freed_total > 0"
print(f"    /metrics: {freed[0]} (counted in the engine core)")
EOF
COMPRESSED="$(podman logs "$CONTAINER" 2>&1 | grep 'madakv compressed request=' | tail -1 || true)"
[ -n "$COMPRESSED" ] || die "no 'madakv compressed' line in the container's log"
echo "    container log: ${COMPRESSED#*\] }"
end "HTTP 200 x2, answers non-empty, full cache right, /metrics ok, KV compressed in the container"

# ------------------------------------------------------------------------------------ 6. cleanup
if [ "$KEEP" = 0 ]; then
  begin cleanup "podman rm -f $CONTAINER"
  podman --runtime "$RUNTIME" rm -f -t 10 "$CONTAINER" >/dev/null
  STARTED=0
  podman container exists "$CONTAINER" && die "container $CONTAINER still exists"
  end "stopped and removed"
fi
