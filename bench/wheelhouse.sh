#!/usr/bin/env bash
# Run HERE, on a machine that reaches PyPI: download the cp312 manylinux wheels that the bare GPU
# machine lacks, pack them into one tar, split it into parts small enough for one device call
# each, and print the sequence of device calls that carries them over and runs bench/gpu.sh.
#
#   bench/wheelhouse.sh            # -> .wheelhouse/ (git-ignored): wheels/, parts, sha256
#
# Versions are the ones installed in .venv here, so the GPU run uses what the tests here used.
# Why these packages: the device image (Python 3.12, see bench/README.md) has torch, timm, onnx,
# onnxscript, onnxruntime (CPU build only), numpy, pillow, scikit-image, pytest, httpx,
# prometheus-client, uvloop, anyio, h11, click; it lacks onnxruntime-gpu and the service's
# FastAPI/pydantic stack below.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
WHEELHOUSE=.wheelhouse
# One call carries the working tree plus one part, at most 64 MiB together; the tree is a few MiB.
PART_MB=${PART_MB:-48}
CARRY_LIMIT_BYTES=$((64 * 1024 * 1024))
PACKAGES=(
  onnxruntime-gpu
  fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
  annotated-types typing-extensions python-multipart uvicorn httptools opentelemetry-api
)

version_here() {
  "$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"
}

rm -rf "$WHEELHOUSE"
mkdir -p "$WHEELHOUSE/wheels"
specs=()
for name in "${PACKAGES[@]}"; do
  specs+=("$name==$(version_here "$name")")
done
echo "downloading: ${specs[*]}" >&2
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$WHEELHOUSE/wheels" "${specs[@]}"

# Requirements of these wheels that are not in the list: each must already be on the device
# (bench/README.md lists what is); print them so a new one is noticed.
"$PYTHON" - "$WHEELHOUSE/wheels" "${PACKAGES[@]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path

norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
brought = {norm(p) for p in sys.argv[2:]}
needed = {}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
                if name not in brought:
                    needed.setdefault(name, []).append(wheel.name.split("-")[0])
print("requirements expected on the device:", ", ".join(f"{k} ({', '.join(v)})" for k, v in sorted(needed.items())),
      file=sys.stderr)
EOF

# MODELS="a.onnx b.onnx": ONNX exports made here, packed too, for a device whose torch cannot
# export (gpu.sh's setup puts them where its export stage looks, which then keeps them). Name
# them vit_b16_fp16.onnx / vit_b16_fp32.onnx; each adds its size in parts (ViT-B fp16: 173 MB).
contents=(wheels)
if [ -n "${MODELS:-}" ]; then
  mkdir -p "$WHEELHOUSE/models"
  for model in $MODELS; do cp "$model" "$WHEELHOUSE/models/"; done
  contents+=(models)
fi
tar -cf "$WHEELHOUSE/vitserve-wheels.tar" -C "$WHEELHOUSE" "${contents[@]}"
(cd "$WHEELHOUSE" && sha256sum vitserve-wheels.tar > vitserve-wheels.tar.sha256)
split -b "${PART_MB}M" "$WHEELHOUSE/vitserve-wheels.tar" "$WHEELHOUSE/vitserve-wheels.tar.part-"
rm "$WHEELHOUSE/vitserve-wheels.tar"

tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
largest_part=$(stat -c %s "$WHEELHOUSE"/vitserve-wheels.tar.part-* | sort -n | tail -1)
echo "working tree ${tree_bytes} bytes + largest part ${largest_part} bytes per call (limit ${CARRY_LIMIT_BYTES})" >&2
if (( tree_bytes + largest_part + 1024 > CARRY_LIMIT_BYTES )); then
  echo "TOO LARGE for one call: rerun with a smaller PART_MB (e.g. PART_MB=$(( (CARRY_LIMIT_BYTES - tree_bytes) / 1048576 - 4 )))" >&2
  exit 1
fi

du -sh "$WHEELHOUSE"/wheels/* | sed 's/^/  /' >&2
parts=("$WHEELHOUSE"/vitserve-wheels.tar.part-*)
move='mkdir -p /tmp/vitserve-wheels && mv .wheelhouse/vitserve-wheels.tar.* /tmp/vitserve-wheels/ && ls -l /tmp/vitserve-wheels'
echo
echo "Device calls, back to back (the machine goes back after 30 s idle; /tmp goes with it):"
first=1
for part in "${parts[@]}"; do
  carry="[\"$part\"]"
  if (( first )); then carry="[\"$WHEELHOUSE/vitserve-wheels.tar.sha256\", \"$part\"]"; first=0; fi
  echo "  run(carry=$carry, timeout_s=120, command='$move')"
done
echo "  run(timeout_s=600, command='bash bench/gpu.sh \$OUT')"
echo
echo "${#parts[@]} parts; bench/README.md explains the results."
