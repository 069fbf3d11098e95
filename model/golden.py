"""``vitserve export --golden IMAGES``: a few images and the top-1 class the exported file gives them,
written into its metadata (``vitserve.golden``).

A server checks every new version on them before it takes traffic (service/serving/golden.py): a
version that answers one of them with another class never serves. Each image is stored downscaled
(short side 256, JPEG) to keep the metadata small, and its expected class is computed from those
stored bytes with the service's own pre-processing on ONNX Runtime's CPU provider, so the check
compares like with like. Choose images the model is sure of: a near-tie may flip between providers.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from service.core.metadata import GOLDEN_KEY, PREFIX, ModelMetadata
from service.core.onnx_facts import CPU_PROVIDER
from service.runtime.preprocess import load_pixels

STORED_SHORT_SIDE = 256
MAX_GOLDEN_IMAGES = 16


class GoldenError(ValueError):
    """A golden image cannot be read, or the file cannot be run on it."""


def stored_bytes(path: Path) -> bytes:
    """The image as it is kept in the metadata: RGB, short side at most 256, JPEG quality 90."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((10**6, STORED_SHORT_SIDE) if image.width >= image.height else (STORED_SHORT_SIDE, 10**6))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
    except (OSError, ValueError) as exc:
        raise GoldenError(f"golden image {path}: cannot be read as an image ({exc})") from None
    return buffer.getvalue()


def add_golden_images(onnx_path: str | os.PathLike, images: list[Path]) -> list[dict[str, object]]:
    """Compute each image's top-1 with the file itself and write them into its metadata; returns the entries."""
    if not images:
        return []
    if len(images) > MAX_GOLDEN_IMAGES:
        raise GoldenError(f"{len(images)} golden images; at most {MAX_GOLDEN_IMAGES} are kept in the metadata")
    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    session = ort.InferenceSession(str(path), providers=[CPU_PROVIDER])
    feed = session.get_inputs()[0]
    outputs = [o.name for o in session.get_outputs()]
    logits_name = "logits" if "logits" in outputs else outputs[0]
    dtype = np.float16 if "float16" in feed.type else np.float32
    entries: list[dict[str, object]] = []
    for image in images:
        data = stored_bytes(image)
        pixels = load_pixels(data, metadata.preprocessing, max_pixels=10**9)
        (logits,) = session.run([logits_name], {feed.name: pixels[None].astype(dtype)})
        top1 = int(np.asarray(logits)[0].argmax())
        entries.append({"name": image.name, "image": base64.b64encode(data).decode("ascii"), "top1": top1})
    key = PREFIX + GOLDEN_KEY
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=key, value=json.dumps(entries))
    onnx.save_model(model, str(path))
    return entries
