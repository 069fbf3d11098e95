#!/usr/bin/env bash
# The GPU run, on the bare H200 machine (no network), in ONE device call of at most ~6 minutes:
#
#   bash bench/gpu.sh OUT              the run: stages below, in order of value, each bounded
#   bash bench/gpu.sh --prepare OUT    an earlier call of the sequence: stash the parts it carried,
#                                      unpack what is complete, record what the machine has (~15 s)
#   bash bench/gpu.sh --dry-run OUT    here, on the CPU: every stage with small sizes (tests/bench)
#
# bench/wheelhouse.sh (run here first) builds the parts and prints the calls; bench/README.md,
# "On the GPU machine", explains them and the time budget.
#
#   setup   stash + unpack the carried parts (bench/carry), pick the onnxruntime (the carried
#           onnxruntime-gpu; else the image's own if it has CUDA), draw the ViT-B/16 weights again
#           from the carried skeletons (no export there)                              -> gpu.log
#   record  GPU, driver, versions, providers; per model, from an ORT profile of one run, every
#           Attention node's provider, and the kernels that ran it (bench/gpu_record.py) -> machine.md
#   tests   pytest tests/gpu tests/export/test_export_gpu.py              -> tests.log, tests-report.txt
#   engine  ViT-B/16 fp16 + fp32 at batch 1, 8, 32, 128, 256; buckets / CUDA graphs / pinned memory
#           on and off at 32 and 128 (bench/engine.py)                        -> engine.md, engine.json
#   serve   `vitserve serve` with the best engine options, real JPEGs, c=1, 64, 256 (and --workers 16
#           if `vitserve serve` has it): req/s, p50/p99, device memory, host decode capacity -> serve.md
#
# Each stage runs under `timeout` within what is left of the run's budget (GPU_SH_BUDGET_S, 370 s);
# a failing or timed-out stage does not stop the next. OUT gets at most 8 files: summary.md (each
# stage's status and seconds, the key lines), machine.md, tests.log, tests-report.txt, engine.md,
# engine.json, serve.md, gpu.log.
set -uo pipefail

MODE=run
case "${1:-}" in
  --prepare) MODE=prepare; shift ;;
  --dry-run) MODE=dry-run; shift ;;
esac
OUT=${1:?usage: bash bench/gpu.sh [--prepare|--dry-run] OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
CARRIED=$REPO/.wheelhouse  # what this call carried, in the working tree's copy (moved out by stash)
if [ "$MODE" = dry-run ]; then
  # Here .wheelhouse holds every part built: the dry run must not move them. DRY_CARRIED=DIR copies
  # the parts of DIR in, as if carried (for this machine's python: PYVER=3.11 bench/wheelhouse.sh).
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/vitserve-gpu-dry-XXXXXX")
  CARRY=${CARRY:-$SCRATCH/carry} WORK=${WORK:-$SCRATCH/work} CARRIED=$SCRATCH/carried
  mkdir -p "$CARRIED"
  [ -n "${DRY_CARRIED:-}" ] && cp "$DRY_CARRIED"/carry.json "$DRY_CARRIED"/*.part-* "$CARRIED"/
  BUDGET_S=${GPU_SH_BUDGET_S:-240}
else
  CARRY=${CARRY:-/tmp/vitserve-carry}  # the parts and what they unpack to: kept between calls while warm
  WORK=${WORK:-/tmp/vitserve-gpu}      # the models drawn again, the serve JSON
  BUDGET_S=${GPU_SH_BUDGET_S:-370}
fi
DEADLINE=$(( $(date +%s) + BUDGET_S ))
mkdir -p "$CARRY" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if [ "$MODE" = prepare ]; then
  exec > >(tee -a "$OUT/prepare.log") 2>&1
  "$PY" -m bench.carry stash "$CARRIED" "$CARRY/store"
  "$PY" -m bench.carry unpack "$CARRY/store" "$CARRY"
  # What the machine has, with the carried onnxruntime when it is already unpacked.
  [ -f "$CARRY/ort/.carry-sha256" ] && export PYTHONPATH="$CARRY/ort${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" bench/gpu_record.py
  exit 0
fi

exec > >(tee -a "$OUT/gpu.log") 2>&1
SUMMARY=$WORK/summary.rows
: > "$SUMMARY"

run_stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then
    echo "| $name | not run: the run's ${BUDGET_S} s are spent | 0 |" >> "$SUMMARY"
    return
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local started=$SECONDS status verdict=ok
  timeout --kill-after=10 "$limit" "$@"
  status=$?
  (( status == 124 || status == 137 )) && verdict="TIMED OUT after ${limit}s"
  (( status != 0 && status != 124 && status != 137 )) && verdict="FAILED (exit $status)"
  echo "| $name | $verdict | $(( SECONDS - started )) |" >> "$SUMMARY"
}

# -- setup: runs in this shell (its choices are the environment of every later stage) -----------------
setup() {
  "$PY" -m bench.carry stash "$CARRIED" "$CARRY/store" || return 1
  "$PY" -m bench.carry unpack "$CARRY/store" "$CARRY"  # a damaged archive is reported; go on
  local site=""
  if [ -f "$CARRY/ort/.carry-sha256" ]; then
    site="$CARRY/ort"
    echo "onnxruntime: the carried one ($CARRY/ort)"
    # onnxruntime.preload_dlls() looks for the CUDA libraries in nvidia/ beside the onnxruntime package.
    local nvidia
    nvidia=$("$PY" -I -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)
    [ -n "$nvidia" ] && [ ! -e "$site/nvidia" ] && ln -s "$nvidia" "$site/nvidia"
  elif "$PY" -I -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
    echo "onnxruntime: the image's own (it has the CUDA provider; nothing carried)"
  else
    echo "onnxruntime: NONE with CUDA (neither carried nor the image's own): the GPU stages will say so"
  fi
  [ -d "$CARRY/service/site" ] && site="${site:+$site:}$CARRY/service/site"
  export PYTHONPATH="${site:+$site:}$REPO"
  # The loader still finds the CUDA libraries should preload_dlls not know the image's layout.
  local libs
  libs=$("$PY" -I -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for r in nvidia.__path__ for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})))' 2>/dev/null)
  [ -n "$libs" ] && export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

  local skeletons=$CARRY/service/models
  if [ "$MODE" = dry-run ]; then  # the bundled digits model stands in, through the same skeleton path
    skeletons=$WORK/skeletons
    "$PY" -m bench.carry strip --out "$skeletons" models/digits/model.onnx > /dev/null || return 1
    "$PY" -m bench.carry regenerate "$skeletons/model.skeleton.onnx" "$WORK/digits_fp32.onnx" || return 1
    MODELS=("$WORK/digits_fp32.onnx")
  else
    MODELS=()
    local precision
    for precision in fp16 fp32; do
      local path=$WORK/vit_b16_$precision.onnx
      if [ ! -f "$path" ] && [ -f "$skeletons/vit_b16_$precision.skeleton.onnx" ]; then
        "$PY" -m bench.carry regenerate "$skeletons/vit_b16_$precision.skeleton.onnx" "$path"
      elif [ ! -f "$path" ]; then  # nothing carried: the machine's torch exports (a minute or more)
        echo "no skeleton for $precision: exporting with the machine's torch"
        "$PY" -m service.cli export random:vit_base_patch16_224 -o "$path.tmp.onnx" --precision "$precision" \
          --no-verify --no-progress && mv "$path.tmp.onnx" "$path"
      fi
      [ -f "$path" ] && MODELS+=("$path")
    done
  fi
  echo "models: ${MODELS[*]:-none}"
  (( ${#MODELS[@]} > 0 ))
}

started=$SECONDS
MODELS=()
setup
status=$?
echo "| setup | $([ $status = 0 ] && echo ok || echo "FAILED (exit $status)") | $(( SECONDS - started )) |" >> "$SUMMARY"
# The stages run as `timeout ... bash -c stage_NAME`: what they need goes through the environment.
export VITSERVE_GPU_MODELS=$WORK VITSERVE_GPU_REPORT_DIR=$OUT
export MODE PY OUT WORK MODEL_PATHS="${MODELS[*]}" SERVE_MODEL="${MODELS[0]:-}"

model_flags() { local m; for m in $MODEL_PATHS; do printf -- '--model\n%s\n' "$m"; done; }

stage_record() {
  mapfile -t flags < <(model_flags)
  "$PY" bench/gpu_record.py "${flags[@]}" --markdown "$OUT/machine.md"
}

stage_tests() {
  local paths=(tests/gpu tests/export/test_export_gpu.py)
  # Here the GPU tests skip; the CPU half of tests/gpu (engine options) is CI's, and slow on 2 cores.
  [ "$MODE" = dry-run ] && paths=(tests/gpu/test_gpu_engine.py tests/export/test_export_gpu.py)
  "$PY" -m pytest "${paths[@]}" -q -rA -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
  return "${PIPESTATUS[0]}"
}

stage_engine() {
  mapfile -t flags < <(model_flags)
  local sizes=(--providers cuda --configs default,plain,buckets,pinned,cudagraph,cudagraph+pinned
    --batch-sizes 1,8,32,128,256 --option-batch-sizes 32,128 --seconds 0.3 --passes 2)
  [ "$MODE" = dry-run ] && sizes=(--providers cpu --configs default,buckets --batch-sizes 1,2
    --option-batch-sizes 2 --seconds 0.1 --passes 1)
  # engine.py rewrites both files after every row: a timeout keeps the rows done (fp16 first).
  "$PY" bench/engine.py "${flags[@]}" "${sizes[@]}" --markdown "$OUT/engine.md" --json "$OUT/engine.json"
}

stage_serve() {
  local buckets=1,8,32,128 worker_levels=64,256
  local load=(--concurrency 1,64,256 --duration-s 6 --warmup-s 2 --max-batch-size 128
    --ceiling-batch-sizes 1,8,32,128 --ceiling-seconds 1.5 --decode-capacity-s 3)
  if [ "$MODE" = dry-run ]; then
    buckets=1,2,4 worker_levels=1,4
    load=(--concurrency 1,4 --duration-s 1 --warmup-s 0.5 --max-batch-size 4 --ceiling-batch-sizes 1,4
      --ceiling-seconds 0.3 --decode-capacity-s 0.5)
  fi
  {
    # The engine stage's best option set, as the service's settings (none when nothing paid).
    local lines=() settings=() line why="no engine.json: the defaults"
    [ -f "$OUT/engine.json" ] && mapfile -t lines < <("$PY" bench/engine.py --best-env "$OUT/engine.json")
    for line in "${lines[@]}"; do
      case $line in
        "# "*) why=${line#\# } ;;
        VITSERVE_BATCH_BUCKETS=*) settings+=("VITSERVE_BATCH_BUCKETS=$buckets") ;;  # the serving buckets
        *=*) settings+=("$line") ;;
      esac
    done
    local env=(VITSERVE_WARMUP_BATCH_SIZES="$buckets" VITSERVE_CACHE_ENTRIES=0 "${settings[@]}")
    echo "## bench/serve.py, $(date -u '+%Y-%m-%d %H:%M UTC'), ${SERVE_MODEL##*/}"
    echo
    echo "serving with: ${settings[*]:-the defaults} ($why)"
    echo
    env "${env[@]}" "$PY" bench/serve.py --model "$SERVE_MODEL" "${load[@]}" --gpu-memory --json "$WORK/serve.json"
    local status=$?
    echo
    if "$PY" -m service.cli serve --help 2>/dev/null | grep -q -- '--workers'; then
      echo "## the same with the multi-process front end (--workers 16)"
      echo
      env "${env[@]}" "$PY" bench/serve.py --model "$SERVE_MODEL" "${load[@]}" --concurrency "$worker_levels" \
        --workers 16 --gpu-memory --json "$WORK/serve-workers.json" || status=1
    else
      echo "(\`vitserve serve\` has no --workers flag yet: the multi-process front end is not measured)"
    fi
    return $status
  } 2>&1 | tee "$OUT/serve.md"
  return "${PIPESTATUS[0]}"
}
export -f model_flags stage_record stage_tests stage_engine stage_serve

run_stage record 60 bash -c stage_record
run_stage tests 120 bash -c stage_tests
run_stage engine 140 bash -c stage_engine
run_stage serve 110 bash -c stage_serve

{
  echo "# bench/gpu.sh ($MODE), $(date -u '+%Y-%m-%d %H:%M UTC'), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU')"
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---:|"
  cat "$SUMMARY"
  echo
  [ -f "$OUT/machine.md" ] && grep -E "^### |every attention node|attention kernel" "$OUT/machine.md"
  [ -f "$OUT/engine.md" ] && { echo; grep -E '^- ' "$OUT/engine.md" | grep -E 'best|settings'; }
  [ -f "$OUT/tests.log" ] && { echo; tail -1 "$OUT/tests.log"; }
  [ -f "$OUT/serve.md" ] && { echo; grep -E '^\| [0-9]|^host decode|^device memory|^serving with' "$OUT/serve.md"; }
} > "$OUT/summary.md"
files=$(find "$OUT" -maxdepth 1 -type f | wc -l)
(( files > 8 )) && echo "WARNING: $files files in $OUT; a device call brings back 8" >> "$OUT/summary.md"
cat "$OUT/summary.md"
[ "$MODE" = dry-run ] && rm -rf "$SCRATCH"
exit 0
