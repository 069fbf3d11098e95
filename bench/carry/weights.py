"""A benchmark model's graph without its large random weights, and those weights drawn again elsewhere.

The GPU benchmarks run ViT-B/16 with random weights: speed does not depend on the values, only
on there being no zeros or denormals (METHOD.md: zeros can run faster). The fp32 export is 346 MB
and the fp16 one 173 MB, random numbers that do not compress, and the GPU machine is reached
through 64 MiB calls. So the export made here travels as a *skeleton*: the exact graph, metadata
and every small initializer (shapes, LayerNorm scales, ...), with each large floating-point
initializer replaced by a record (shape, type, mean and standard deviation of its values here).
On the machine ``regenerate`` draws each one again from a normal distribution with that mean and
deviation (a constant tensor stays that constant), seeded by the initializer's name, and writes
an ordinary ONNX file. No torch is needed there, and no export time is spent.

Several exports of one model (fp32 and fp16) are stripped together: an initializer with the same
*key* (its name without the fp16 wrapper's ``inner.`` prefix) gets one set of statistics and one
seed, so the fp16 model's weights are the fp16 rounding of the fp32 model's, as in a real export,
and the two still agree on real photographs (tests/gpu checks that on the GPU).

The manifest also keeps the SHA-256 of the values drawn here: the machine reports whether its
numpy drew the same ones (it should; the figures do not depend on it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

MIN_ELEMENTS = 4096  # smaller initializers travel as they are (shapes, LayerNorm scales and biases)
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
WRAPPER_PREFIX = "inner."  # model/export.py's Fp16Graph wraps the model as .inner
SKELETON_SUFFIX = ".skeleton.onnx"
MANIFEST_SUFFIX = ".weights.json"


class WeightsError(ValueError):
    """The models cannot be stripped or regenerated consistently (the message names the tensor)."""


def key_of(name: str) -> str:
    return name.removeprefix(WRAPPER_PREFIX)


def seed_of(key: str, base_seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{key}".encode()).digest()[:8], "little")


def draw(record: dict, base_seed: int) -> np.ndarray:
    """The float32 values of one stripped initializer, flat."""
    count = int(np.prod(record["dims"], dtype=np.int64))
    if record["std"] == 0.0:
        return np.full(count, record["mean"], dtype=np.float32)
    values = np.random.default_rng(seed_of(record["key"], base_seed)).standard_normal(count, dtype=np.float32)
    values *= np.float32(record["std"])
    values += np.float32(record["mean"])
    return values


def _raw(values: np.ndarray, data_type: int) -> bytes:
    return values.astype(np.dtype(FLOAT_TYPES[data_type]).newbyteorder("<")).tobytes()  # ONNX raw_data: little-endian


def strip(models: Sequence[Path], out_dir: Path, base_seed: int = 0, min_elements: int = MIN_ELEMENTS) -> list[Path]:
    """Write <stem>.skeleton.onnx and <stem>.weights.json for each model into out_dir; return the skeletons.

    Statistics come from the first model that has a key (list the fp32 export first).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict] = {}
    skeletons = []
    for path in models:
        model = onnx.load(str(path))
        records = []
        for tensor in model.graph.initializer:
            count = int(np.prod(tensor.dims, dtype=np.int64))
            if tensor.data_type not in FLOAT_TYPES or count < min_elements:
                continue
            key = key_of(tensor.name)
            if key not in stats:
                values = numpy_helper.to_array(tensor).astype(np.float64)
                if not np.isfinite(values).all():
                    raise WeightsError(f"{path.name}: {tensor.name} holds non-finite values")
                stats[key] = {"dims": list(tensor.dims), "mean": float(values.mean()), "std": float(values.std())}
            known = stats[key]
            if known["dims"] != list(tensor.dims):
                raise WeightsError(
                    f"{path.name}: {tensor.name} has shape {list(tensor.dims)}, {key} elsewhere {known['dims']}"
                )
            record = {"name": tensor.name, "key": key, "data_type": tensor.data_type, **known}
            record["sha256"] = hashlib.sha256(_raw(draw(record, base_seed), tensor.data_type)).hexdigest()
            records.append(record)
            tensor.ClearField("raw_data")
            for field in ("float_data", "int32_data"):
                tensor.ClearField(field)
        skeleton = out_dir / f"{path.stem}{SKELETON_SUFFIX}"
        onnx.save(model, str(skeleton))
        manifest = {"source": path.name, "base_seed": base_seed, "numpy": np.__version__, "tensors": records}
        (out_dir / f"{path.stem}{MANIFEST_SUFFIX}").write_text(json.dumps(manifest, indent=1) + "\n")
        skeletons.append(skeleton)
    return skeletons


def regenerate(skeleton: Path, out_path: Path) -> dict:
    """skeleton + its manifest -> an ordinary ONNX file at out_path; returns {tensors, identical, numpy}:
    how many were drawn and whether every one equals what was drawn where the skeleton was made."""
    manifest_path = skeleton.with_name(skeleton.name.removesuffix(SKELETON_SUFFIX) + MANIFEST_SUFFIX)
    manifest = json.loads(manifest_path.read_text())
    model = onnx.load(str(skeleton))
    by_name = {t.name: t for t in model.graph.initializer}
    identical = True
    for record in manifest["tensors"]:
        tensor = by_name.get(record["name"])
        if tensor is None or list(tensor.dims) != record["dims"] or tensor.data_type != record["data_type"]:
            raise WeightsError(f"{skeleton.name}: initializer {record['name']} is not the one the manifest describes")
        tensor.raw_data = _raw(draw(record, manifest["base_seed"]), tensor.data_type)
        identical &= hashlib.sha256(tensor.raw_data).hexdigest() == record["sha256"]
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)
    return {"tensors": len(manifest["tensors"]), "identical": identical, "numpy": np.__version__}
