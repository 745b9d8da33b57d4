#!/usr/bin/env bash
# On the head node of the Ray cluster started with docker/ray-cluster/run_node.sh: serve MODEL
# with tensor parallelism over the cluster's GPUs through vLLM's Ray executor, with madakv.
#
#   bash docker/ray-cluster/serve.sh /models/my-vlm
#   TP=8 PP=1 bash docker/ray-cluster/serve.sh /models/my-vlm --max-model-len 32768 \
#     --additional-config '{"madakv": {"policy": "madakv", "budget": 0.2}}'
#
# TP defaults to every GPU the cluster reports (ray.cluster_resources()), PP to 1; TP x PP must
# not exceed it. (vLLM's usual advice: TP within a node, PP across nodes, e.g. TP=8 PP=2 for
# two 8-GPU nodes; plain TP across nodes works but is bound by the network.) The server runs in
# the foreground inside the head's container and listens on HEAD_IP:${PORT:-8000}.
# CUDA only and not run yet: see run_node.sh.
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 2; }
MODEL="$1"; shift
NAME="${CONTAINER_NAME:-madakv-ray}"
DOCKER="${DOCKER:-docker}"

"$DOCKER" exec "$NAME" ray status
GPUS="$("$DOCKER" exec "$NAME" python3 -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(int(ray.cluster_resources().get("GPU", 0)))' | tail -1)"
TP="${TP:-$GPUS}"
PP="${PP:-1}"
[ "$GPUS" -ge 1 ] || { echo "serve.sh: the cluster reports no GPU" >&2; exit 1; }
[ $(( TP * PP )) -le "$GPUS" ] || { echo "serve.sh: TP=$TP x PP=$PP > $GPUS GPUs in the cluster" >&2; exit 1; }
echo "serving $MODEL: $GPUS GPUs in the cluster, tensor parallel $TP, pipeline parallel $PP"
exec "$DOCKER" exec "$NAME" vllm serve "$MODEL" --host 0.0.0.0 --port "${PORT:-8000}" \
  --attention-backend madakv --distributed-executor-backend ray \
  --tensor-parallel-size "$TP" --pipeline-parallel-size "$PP" "$@"
