#!/usr/bin/env bash
# Run HERE (PyPI reachable), in the checkout whose working tree the device calls send: build the few
# bytes a bare H200 machine lacks, as parts that fit the device calls, and print those calls.
#
#   bench/wheelhouse.sh                 # -> .wheelhouse/ (git-ignored): parts, carry.json, plan.md
#   PYVER=3.11 WHEELHOUSE=/tmp/wh311 bench/wheelhouse.sh   # the same for this machine's python: the dry
#                                       # run then unpacks it and imports it here (see the end)
#
# What travels (bench/README.md, "On the GPU machine", has the reasons and the figures):
#   ort      onnxruntime-gpu (the version in .venv) for cp312: its Python files, the Python extension and
#            the CUDA provider with only the sm_90 GPU code an H200 loads (bench/carry/fatbin.py:
#            284 -> 143 MB, 141 MB of zeros); not libonnxruntime.so (the C API; the extension does not
#            load it) nor the TensorRT provider (no TensorRT on the machine). Needed only if the
#            machine's own onnxruntime (1.30.0 in its pip list) has no CUDA provider; the run's first
#            call says which.
#   service  the FastAPI stack the machine lacks (pinned as in .venv), and ViT-B/16 fp32 + fp16
#            skeletons: the exports' graphs without their random weights, which bench/gpu.sh draws
#            again there in seconds (bench/carry/weights.py), so no export runs there and the
#            346 MB fp32 export never travels.
# Each is a deterministic tar.xz (x86 filter + LZMA2 preset 9) split into parts as large as a call
# allows: 64 MiB - the working tree (measured below) - the manifest - 1 MiB margin.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

PYTHON=${PYTHON:-.venv/bin/python}
PY_ABS=$(realpath -s "$PYTHON")  # -s: a venv's python is a link, and must stay one
PYVER=${PYVER:-3.12}                      # the GPU machine's python3 (KINDS.md: Python 3.12.3)
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}     # carried paths must lie inside the checkout; git-ignored
EXPORTS=${EXPORTS:-.cache/gpu-exports}    # ViT-B/16 exports, kept between builds (a few minutes each)
SM_ARCH=${SM_ARCH:-90}                    # H100 and H200: compute capability 9.0
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/vitserve-wheelhouse-XXXXXX")
trap 'rm -rf "$BUILD"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# The service's stack as the machine lacks it (KINDS.md lists what it has: anyio, h11, click, uvloop,
# httpx, prometheus-client, pillow, numpy, onnx ... but no FastAPI, Starlette, pydantic or uvicorn).
# typing-extensions and anyio travel too: pydantic and starlette need newer ones than may be there.
SERVICE_PACKAGES=(
  fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
  typing-extensions annotated-types annotated-doc anyio python-multipart uvicorn httptools opentelemetry-api
)
version_here() { "$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
pip_target() {  # DIR SPEC... : cpXY manylinux wheels unpacked into DIR, no dependencies, no .pyc
  local dir=$1
  shift
  local abi="cp${PYVER/./}"
  "$PYTHON" -m pip install --quiet --no-deps --no-compile --no-cache-dir --only-binary=:all: \
    --python-version "$PYVER" --implementation cp --abi "$abi" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    --target "$dir" "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  [ -n "$(ls -A "$dir" 2>/dev/null)" ] || { echo "pip installed nothing into $dir" >&2; exit 1; }
}

echo "== ort: onnxruntime-gpu $(version_here onnxruntime-gpu) for cp${PYVER/./}" >&2
pip_target "$BUILD/ort" "onnxruntime-gpu==$(version_here onnxruntime-gpu)"
capi="$BUILD/ort/onnxruntime/capi"
rm -f "$capi"/libonnxruntime.so.* "$capi"/libonnxruntime_providers_tensorrt.so
rm -rf "$BUILD/ort/bin"
"$PYTHON" -m bench.carry prune "$capi/libonnxruntime_providers_cuda.so" "$capi/cuda.pruned" --arch "$SM_ARCH"
mv "$capi/cuda.pruned" "$capi/libonnxruntime_providers_cuda.so"
# cuobjdump (Triton's package carries one) reads the result as the CUDA tools do: it must list sm_90 only,
# plus the few containers that have nothing for sm_90 and are left as built.
CUOBJDUMP=$("$PYTHON" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)
if [ -x "$CUOBJDUMP" ]; then
  echo "cuobjdump --list-elf of the pruned provider:" >&2
  "$CUOBJDUMP" --list-elf "$capi/libonnxruntime_providers_cuda.so" | grep -o 'sm_[0-9a-z]*' | sort | uniq -c >&2
fi

echo "== service: ${SERVICE_PACKAGES[*]}" >&2
specs=()
for name in "${SERVICE_PACKAGES[@]}"; do specs+=("$name==$(version_here "$name")"); done
pip_target "$BUILD/service/site" "${specs[@]}"
rm -rf "$BUILD/service/site/bin"

echo "== service: ViT-B/16 skeletons" >&2
mkdir -p "$EXPORTS"
for precision in fp32 fp16; do
  path="$EXPORTS/vit_b16_$precision.onnx"
  [ -f "$path" ] && continue
  nice -n 5 "$PYTHON" -m service.cli export random:vit_base_patch16_224 -o "$path.tmp.onnx" \
    --precision "$precision" --no-verify --no-progress
  mv "$path.tmp.onnx" "$path"
done
"$PYTHON" -m bench.carry strip --out "$BUILD/service/models" "$EXPORTS/vit_b16_fp32.onnx" "$EXPORTS/vit_b16_fp16.onnx"
# The models as the machine will draw them must still be a sound pair: fp16 agrees with fp32 on photographs.
for precision in fp32 fp16; do
  "$PYTHON" -m bench.carry regenerate "$BUILD/service/models/vit_b16_$precision.skeleton.onnx" "$BUILD/vit_b16_$precision.onnx"
done
"$PYTHON" bench/gpu_record.py --compare "$BUILD/vit_b16_fp32.onnx" "$BUILD/vit_b16_fp16.onnx"
rm -f "$BUILD"/vit_b16_*.onnx

# What the calls send besides the carried parts: the tracked and untracked-not-ignored files (and
# shared/ when it lies in the checkout: then it is among them).
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
rm -rf "$WHEELHOUSE"
"$PYTHON" -m bench.carry build "$WHEELHOUSE" --tree-bytes "$tree" ort="$BUILD/ort" service="$BUILD/service" \
  | tee "$BUILD/build.txt" >&2

# The device calls, back to back (the machine goes back after 30 s idle, /tmp with it).
"$PYTHON" - "$WHEELHOUSE" > "$WHEELHOUSE/plan.md" <<'EOF'
import json, sys
from pathlib import Path

folder = Path(sys.argv[1])
manifest = json.loads((folder / "carry.json").read_text())
calls = manifest["calls"]
sizes = {p: n for a in manifest["archives"] for p, n in a["parts"]}
print(f"Device calls, back to back, each within 30 s of the last (working tree {manifest['tree_bytes']} bytes):\n")
for i, parts in enumerate(calls, 1):
    carry = [f"{folder}/carry.json"] + [f"{folder}/{p}" for p in parts]
    last = i == len(calls)
    command = "bash bench/gpu.sh $OUT" if last else "bash bench/gpu.sh --prepare $OUT"
    timeout = 420 if last else 120
    total = manifest["tree_bytes"] + sum(sizes[p] for p in parts) + (folder / "carry.json").stat().st_size
    print(f"{i}. run(carry={json.dumps(carry)}, timeout_s={timeout}, command='{command}')")
    print(f"   # {total / 2**20:.1f} MiB of the 64 MiB a call may send\n")
EOF
cat "$WHEELHOUSE/plan.md"

# The dry run of the far side, here: when these parts are for this machine's python, unpack them as
# bench/gpu.sh does and check that onnxruntime imports from them and runs a CPU session.
if [ "$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" = "$PYVER" ]; then
  echo "== dry run: unpack as on the machine, import from the unpacked tree" >&2
  store="$BUILD/store" root="$BUILD/carried"
  mkdir -p "$BUILD/copy/.wheelhouse" && cp "$WHEELHOUSE"/carry.json "$WHEELHOUSE"/*.part-* "$BUILD/copy/.wheelhouse/"
  "$PYTHON" -m bench.carry stash "$BUILD/copy/.wheelhouse" "$store"
  "$PYTHON" -m bench.carry unpack "$store" "$root"
  site_nvidia=$("$PYTHON" -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
  [ -n "$site_nvidia" ] && ln -s "$site_nvidia" "$root/ort/nvidia"
  stub=""
  if command -v cc > /dev/null; then
    echo 'int cuTensorMapEncodeTiled(void) { return 999; /* CUDA_ERROR_UNKNOWN */ }' > "$BUILD/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$BUILD/libcuda.so.1" "$BUILD/stub.c" && stub="$BUILD/libcuda.so.1"
  fi
  # -I: ignore PYTHONPATH and the user site: only the unpacked tree is imported.
  (cd "$BUILD" && "$PY_ABS" -I - "$root" "$REPO" "$stub" <<'EOF'
import sys
root, repo = sys.argv[1], sys.argv[2]
sys.path[:0] = [f"{root}/ort", f"{root}/service/site"]
import onnxruntime as ort
assert ort.__file__.startswith(root), ort.__file__
print("onnxruntime", ort.__version__, "from", ort.__file__)
print("providers:", ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers()
import fastapi, pydantic, pydantic_settings, starlette, uvicorn
for module in (fastapi, pydantic, pydantic_settings, starlette, uvicorn):
    assert module.__file__.startswith(root), module.__file__
print("fastapi", fastapi.__version__, "pydantic", pydantic.__version__, "uvicorn", uvicorn.__version__, "from", root)
import numpy as np
session = ort.InferenceSession(f"{repo}/models/digits/model.onnx", providers=["CPUExecutionProvider"])
feed = session.get_inputs()[0]
shape = [2 if not isinstance(d, int) else d for d in feed.shape]
out = session.run(None, {feed.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)})[0]
print("CPU session on models/digits/model.onnx:", out.shape, "finite:", bool(np.isfinite(out).all()))
# The pruned CUDA provider still loads: the dynamic loader maps it, resolves the CUDA libraries of the
# nvidia-* packages, and runs its initialisers, which register every fat binary with the CUDA runtime.
# This machine has no driver: a stub libcuda.so.1 stands in for the one symbol the provider takes from it.
stub = sys.argv[3]
if stub:
    import ctypes
    ort.preload_dlls()
    ctypes.CDLL(stub, mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(f"{root}/ort/onnxruntime/capi/libonnxruntime_providers_shared.so", mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(f"{root}/ort/onnxruntime/capi/libonnxruntime_providers_cuda.so")
    print("pruned libonnxruntime_providers_cuda.so: loaded, its fat binaries registered")
else:
    print("no C compiler here for a stub libcuda.so.1: the pruned provider was not loaded")
EOF
  )
else
  echo "(the parts are for Python $PYVER; to dry-run the unpacked tree here: PYVER=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') WHEELHOUSE=/tmp/wh bench/wheelhouse.sh)" >&2
fi
