#!/usr/bin/env bash
# Everything a GPU run needs, in one command on the bare GPU machine (no network):
#
#   bash bench/gpu.sh OUT [STAGE ...]        STAGE: setup export test engine serve (default: all, in order)
#
#   setup   install the wheels bench/wheelhouse.sh made (parts already moved to /tmp/vitserve-wheels)
#           into /tmp/vitserve-site; write OUT/env.txt (GPU, driver, versions, providers)
#   export  ViT-B/16 random weights, fp16 and fp32, into /tmp/vitserve-gpu (kept for later stages)
#   test    pytest tests/gpu + tests/export/test_export_gpu.py -> OUT/tests.log (+ what the tests saw: kernels, placement, memory)
#   engine  bench/engine.py, batch 1..256, every engine option set -> OUT/engine.md, OUT/engine.json
#   serve   bench/serve.py on the fp16 model, JPEG load generator on this machine -> OUT/serve.md
#
# Stages skip work already done on this machine (installed wheels, exported models), so a run cut
# short by the 10-minute limit can go on with `bash bench/gpu.sh $OUT engine serve`. Each stage
# has its own time limit and the whole run ends inside ~9.5 minutes; OUT/summary.md lists what
# ran, how long, and its exit status. bench/README.md explains the sequence and the results.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu.sh OUT [setup export test engine serve]}
shift
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(setup export test engine serve)

cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=/tmp/vitserve-wheels
SITE=/tmp/vitserve-site
WORK=/tmp/vitserve-gpu
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${GPU_SH_BUDGET_S:-570} ))

mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu.log") 2>&1
# The carried wheels come first on the path (onnxruntime-gpu over the image's CPU onnxruntime),
# then the repository itself (it is not pip-installed there).
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export VITSERVE_GPU_MODELS=$WORK VITSERVE_GPU_REPORT_DIR=$OUT
# onnxruntime.preload_dlls() finds CUDA/cuDNN in the nvidia-* packages; should its idea of their
# layout not match the image's, the loader still finds them through this path.
NV_LIBS=$("$PY" - 2>/dev/null <<'PYLIBS'
import glob, os
import nvidia
dirs = {os.path.dirname(p) for root in nvidia.__path__ for p in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PYLIBS
)
[ -n "$NV_LIBS" ] && export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "| stage | status | seconds |" > "$OUT/summary.md.tmp"
echo "|---|---|---:|" >> "$OUT/summary.md.tmp"

left() { echo $(( DEADLINE - $(date +%s) )); }

run_stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  local budget
  budget=$(left)
  (( budget < limit )) && limit=$budget
  if (( limit < 20 )); then
    echo "| $name | not run (time budget spent) | 0 |" >> "$OUT/summary.md.tmp"
    return
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local started=$SECONDS status
  timeout --kill-after=10 "$limit" "$@"
  status=$?
  local verdict=ok
  (( status == 124 || status == 137 )) && verdict="TIMED OUT after ${limit}s"
  (( status != 0 && status != 124 && status != 137 )) && verdict="FAILED (exit $status)"
  echo "| $name | $verdict | $(( SECONDS - started )) |" >> "$OUT/summary.md.tmp"
}

stage_setup() {
  if [ -f "$SITE/.vitserve-installed" ]; then
    echo "wheels already installed in $SITE"
  else
    local parts=("$WHEELS"/vitserve-wheels.tar.part-*)
    if [ ! -e "${parts[0]}" ] || [ ! -f "$WHEELS/vitserve-wheels.tar.sha256" ]; then
      echo "no wheel parts in $WHEELS: carry them first (bench/README.md, bench/wheelhouse.sh prints the calls)"
      return 2
    fi
    cat "${parts[@]}" > "$WHEELS/vitserve-wheels.tar"
    if ! (cd "$WHEELS" && sha256sum -c vitserve-wheels.tar.sha256); then
      echo "checksum mismatch: a part is missing or damaged; present: ${parts[*]}"
      return 2
    fi
    tar -xf "$WHEELS/vitserve-wheels.tar" -C "$WHEELS" && rm "$WHEELS/vitserve-wheels.tar"
    # Exports made elsewhere, if wheelhouse.sh packed any (MODELS=...): the export stage keeps them.
    if compgen -G "$WHEELS/models/*.onnx" > /dev/null; then mkdir -p "$WORK" && cp -n "$WHEELS"/models/*.onnx "$WORK"/; fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/wheels/*.whl || return 1
    touch "$SITE/.vitserve-installed"
  fi
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
    "$PY" - <<'EOF'
import os, platform, onnxruntime as ort, numpy, torch
print(f"Python {platform.python_version()}, onnxruntime {ort.__version__} ({ort.__file__}), numpy {numpy.__version__}, "
      f"torch {torch.__version__} (CUDA {torch.version.cuda})")
ort.preload_dlls()
print("onnxruntime providers:", ort.get_available_providers())
from onnx import TensorProto, helper
vec = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [4])
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [vec("x")], [vec("y")])
probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
session = ort.InferenceSession(probe.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("a CUDA session gets:", session.get_providers())
print("LD_LIBRARY_PATH:", os.environ.get("LD_LIBRARY_PATH", ""))
import fastapi, pydantic, uvicorn, service.http.app  # the service's stack imports
print(f"fastapi {fastapi.__version__}, pydantic {pydantic.__version__}, uvicorn {uvicorn.__version__}")
EOF
  } > "$OUT/env.txt" 2>&1
  local status=$?
  cat "$OUT/env.txt"
  return $status
}

stage_export() {
  local precision
  for precision in fp16 fp32; do
    local path="$WORK/vit_b16_$precision.onnx"
    if [ -f "$path" ]; then echo "$path exists"; continue; fi
    "$PY" -m service.cli export random:vit_base_patch16_224 -o "$path.tmp.onnx" --precision "$precision" \
      --no-verify --no-progress || return 1
    mv "$path.tmp.onnx" "$path"
  done
  ls -l "$WORK"
}

stage_test() {
  # tests/gpu, and the export issue's own CUDA test (tiny model: fp16 placement and parity).
  "$PY" -m pytest tests/gpu tests/export/test_export_gpu.py -q -rA -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
  return "${PIPESTATUS[0]}"
}

stage_engine() {
  # Seven option sets x two models x nine batch sizes fit the stage's limit ('static' is implied by
  # the graphs; pinned/buffer is the graph-less half of cudagraph+pinned/buffer).
  "$PY" bench/engine.py --model "$WORK/vit_b16_fp16.onnx" --model "$WORK/vit_b16_fp32.onnx" --providers cuda \
    --configs default,plain,buckets,pinned,cudagraph,cudagraph+pinned,cudagraph+pinned/buffer \
    --seconds "${ENGINE_SECONDS:-0.3}" --passes 2 --markdown "$OUT/engine.md" --json "$OUT/engine.json"
}

stage_serve() {
  # The service as shipped, with GPU-sized batches. GPU options stay at their defaults (off); to
  # serve with some, set them for this stage: VITSERVE_BATCH_BUCKETS=1,8,32,64 bash bench/gpu.sh $OUT serve
  VITSERVE_WARMUP_BATCH_SIZES=1,8,32,64 VITSERVE_ORT_ALLOW_SPINNING=false \
    "$PY" bench/serve.py --model "$WORK/vit_b16_fp16.onnx" --concurrency 1,16,64,256 --duration-s 8 \
    --warmup-s 2 --max-batch-size 64 --max-queue-delay-ms 2 --ceiling-batch-sizes 1,8,32,64 \
    --ceiling-seconds 2 2>&1 | tee "$OUT/serve.md"
  return "${PIPESTATUS[0]}"
}

export PY SITE WHEELS WORK OUT
export -f stage_setup stage_export stage_test stage_engine stage_serve
declare -A LIMIT_S=([setup]=120 [export]=200 [test]=200 [engine]=240 [serve]=150)
for stage in "${STAGES[@]}"; do
  if [ -z "${LIMIT_S[$stage]:-}" ]; then echo "unknown stage $stage (setup export test engine serve)"; exit 2; fi
  run_stage "$stage" "${LIMIT_S[$stage]}" bash -c "stage_$stage"
done

{
  echo "# bench/gpu.sh $(date -u '+%Y-%m-%d %H:%M UTC'): ${STAGES[*]}"
  echo
  cat "$OUT/summary.md.tmp"
  for f in engine.md; do
    [ -f "$OUT/$f" ] && { echo; grep -E '^- .*(best|targets)' "$OUT/$f"; }
  done
  [ -f "$OUT/tests.log" ] && { echo; tail -3 "$OUT/tests.log"; }
} > "$OUT/summary.md"
rm -f "$OUT/summary.md.tmp"
cat "$OUT/summary.md"
