"""Writing an ONNX file, with its weights in ``<file>.data`` when protobuf could not hold them.

The one save used by both ways a file is made: `vitserve export` (model/export.py) and
`vitserve export --from-onnx` (model/embed_metadata.py). Needs the ``onnx`` package only (no torch).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

# Protobuf cannot serialise a message over 2 GiB; above this many bytes of weights they go to
# ``<name>.onnx.data`` next to the model (ViT-H fp32 is 2.5 GB). The margin covers the graph itself.
DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES = 2000 * 1024**2


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weights held in the graph (raw or typed fields alike)."""
    total = 0
    for tensor in model.graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def save_onnx(
    model: onnx.ModelProto,
    output: str | os.PathLike,
    *,
    external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Path | None:
    """Write ``model``; weights over the threshold go to ``<output>.data``. Returns that file or None."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    # onnx appends to an existing external-data file, so a stale one from an earlier export would
    # be silently kept in front of the new weights.
    data_path.unlink(missing_ok=True)
    if initializer_bytes(model) <= external_data_threshold_bytes:
        onnx.save_model(model, path)
        return None
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_path.name,
        size_threshold=1024,
    )
    # onnx creates the weights file 0600; a service running as another user (the Docker image)
    # could then read the model but not its weights. Give it the .onnx file's umask-made mode.
    data_path.chmod(path.stat().st_mode & 0o777)
    return data_path
