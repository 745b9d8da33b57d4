#!/usr/bin/env bash
# Start one node of a Ray cluster that serves a model with tensor parallelism across machines,
# each node running the CUDA image (docker/Dockerfile.cuda built with the `distributed` extra):
#
#   docker build -f docker/Dockerfile.cuda --build-arg MADAKV_EXTRAS=cuda,distributed \
#     -t madakv-vllm:cuda-ray .                               # on every node (or push/pull it)
#   bash docker/ray-cluster/run_node.sh head   HEAD_IP        # on the head node
#   bash docker/ray-cluster/run_node.sh worker HEAD_IP        # on each other node
#   bash docker/ray-cluster/serve.sh /models/my-vlm           # on the head node, see there
#
# CUDA only, and NOT RUN YET (no GPU and no registry on the project's machines): vLLM's CPU
# platform refuses the Ray executor at startup ("current platform cpu does not support ray"),
# stock vLLM included, so there is no CPU variant of this example. madakv's CUDA path is opt-in
# and itself unverified on a GPU (MADAKV_EXPERIMENTAL_CUDA=1 is set below on every node: Ray's
# workers inherit the container's environment, and each loads the plugin).
#
# The container runs `ray start --block` in the foreground of a detached container named
# $CONTAINER_NAME with the host's network (Ray, NCCL and the API port need no mapping). Every
# node must see the model at the same path: mount the same directory (shared filesystem or a
# copy) at /models, or share a Hugging Face cache and pass a model id to serve.sh.
#
# Environment:
#   MADAKV_IMAGE=madakv-vllm:cuda-ray   image (the same one on every node)
#   MODEL_DIR=/models                   host directory mounted read-only at /models
#   HF_CACHE=$HOME/.cache/huggingface   mounted at /root/.cache/huggingface
#   NODE_IP=<first address of hostname -I>   this node's address, as the other nodes reach it
#   RAY_PORT=6379  CONTAINER_NAME=madakv-ray  SHM_SIZE=16g
#   DOCKER=docker                       or podman (then GPU_ARGS="--device nvidia.com/gpu=all")
#   GPU_ARGS="--gpus all"
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG: passed through when set
#     (set the two *_SOCKET_IFNAME to the interface that carries NODE_IP on multi-homed hosts)
set -euo pipefail

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 2; }
[ $# -eq 2 ] || usage
ROLE="$1"; HEAD_IP="$2"
IMAGE="${MADAKV_IMAGE:-madakv-vllm:cuda-ray}"
MODEL_DIR="${MODEL_DIR:-/models}"
HF_CACHE="${HF_CACHE:-$HOME/.cache/huggingface}"
NODE_IP="${NODE_IP:-$(hostname -I | awk '{print $1}')}"
RAY_PORT="${RAY_PORT:-6379}"
NAME="${CONTAINER_NAME:-madakv-ray}"
DOCKER="${DOCKER:-docker}"
read -r -a GPU <<< "${GPU_ARGS:---gpus all}"

case "$ROLE" in
  head)   RAY_ARGS=(--head --port="$RAY_PORT" --node-ip-address="$NODE_IP" --dashboard-host=0.0.0.0) ;;
  worker) RAY_ARGS=(--address="$HEAD_IP:$RAY_PORT" --node-ip-address="$NODE_IP") ;;
  *) usage ;;
esac
[ -n "$NODE_IP" ] || { echo "run_node.sh: set NODE_IP (this node's address)" >&2; exit 2; }
mkdir -p "$HF_CACHE"

ENV_ARGS=(-e MADAKV_EXPERIMENTAL_CUDA=1 -e VLLM_HOST_IP="$NODE_IP")
for v in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG HF_TOKEN; do
  if [ -n "${!v:-}" ]; then ENV_ARGS+=(-e "$v=${!v}"); fi
done

"$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true
"$DOCKER" run -d --name "$NAME" --network host --shm-size "${SHM_SIZE:-16g}" "${GPU[@]}" \
  "${ENV_ARGS[@]}" -v "$MODEL_DIR:/models:ro" -v "$HF_CACHE:/root/.cache/huggingface" \
  --entrypoint ray "$IMAGE" start --block "${RAY_ARGS[@]}"
echo "started $ROLE node $NODE_IP ($NAME); cluster state: $DOCKER exec $NAME ray status"
