#!/usr/bin/env bash
# One-command verification of the CUDA path on a machine with an NVIDIA GPU.
#
#   bash scripts/gpu_check.sh                 # venv .venv-cuda, installs the `cuda` extra (vllm==0.32.*)
#   MADAKV_VENV=/path bash scripts/gpu_check.sh   # reuse a venv that already has vLLM's CUDA build
#   GPU_CHECK_SKIP_BENCH=1 bash scripts/gpu_check.sh   # steps 1-3 only
#
# Steps (each prints its own verdict; the script exits non-zero if any of 1-3 fails):
#   1. install: scripts/setup.sh with MADAKV_EXTRAS=cuda,test (skipped when MADAKV_VENV imports vLLM)
#   2. kernel: scripts/gpu_kernel_check.py -- our per-head FlashAttention call vs a dense fp32
#      reference, every FA version the GPU supports x fp16/bf16 x block 16/32 x GQA 1/4/7 x head
#      dim 64/128 x decode/mixed prefill
#   3. engine: tests/test_cuda.py with MADAKV_EXPERIMENTAL_CUDA=1 -- full == stock FLASH_ATTN,
#      madakv and snapkv at 0.2 with decode and re-compression (shadow check), V1 runner, pages return;
#      with 2+ GPUs and ray installed (MADAKV_EXTRAS=cuda,test,bench,distributed), also TP=2 over
#      --distributed-executor-backend ray == TP=1 (tests/test_tensor_parallel.py, skipped otherwise)
#   4. numbers: a short decode comparison (scripts/bench_decode.py) and the KV pages a request holds
#      after compression vs stock (scripts/bench_capacity.py --memory-only), both against stock vLLM
# Budget: under 8 minutes on one H100/H200-class GPU with a warm pip cache (step 1 dominates).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
export MADAKV_VENV="${MADAKV_VENV:-$REPO/.venv-cuda}"
PY="$MADAKV_VENV/bin/python"
export MADAKV_EXPERIMENTAL_CUDA=1
T0=$(date +%s)
say() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
status=0

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  say "no NVIDIA GPU visible (nvidia-smi -L failed): nothing to check"; exit 2
fi
nvidia-smi -L

say "1/4 install"
if [ -x "$PY" ] && "$PY" -c 'import vllm, torch; assert torch.cuda.is_available()' 2>/dev/null; then
  say "    reusing $MADAKV_VENV ($("$PY" -c 'import vllm; print(vllm.__version__)'))"
  "$PY" -m pip install -q -e "$REPO[test,bench]" --no-deps || { say "    pip install -e . failed"; exit 1; }
else
  MADAKV_EXTRAS=cuda,test,bench bash scripts/setup.sh || { say "    setup failed"; exit 1; }
fi

say "2/4 per-head FlashAttention vs dense reference"
if "$PY" scripts/gpu_kernel_check.py; then say "    kernel: ok"; else say "    kernel: FAILED"; status=1; fi

say "3/4 tests/test_cuda.py on the GPU"
if "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
     tests/test_tensor_parallel.py::test_tp2_over_ray_on_cuda_matches_tp1 -rs; then say "    engine: ok"; else say "    engine: FAILED"; status=1; fi

if [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
  say "4/4 decode and memory vs stock (numbers, not a verdict)"
  timeout 240 "$PY" scripts/bench_decode.py --layers 2 --lengths 4096,16384 --budgets full,0.2 --images 16 \
    --decode 32 --repeats 2 --out models/gpu_bench_decode.json || say "    bench_decode did not finish"
  timeout 120 "$PY" scripts/bench_capacity.py --memory-only --memory-lengths 2048 8192 \
    --out models/gpu_bench_capacity.json || say "    bench_capacity did not finish"
fi

if [ "$status" = 0 ]; then say "CUDA path: all checks passed"; else say "CUDA path: FAILED (see above)"; fi
exit "$status"
