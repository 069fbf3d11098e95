"""The check a new model version passes before it takes traffic.

A version whose metadata carries golden images (``vitserve export --golden IMAGES`` writes them,
each with the top-1 class the exported model gave it) must give the same top-1 on each. One
without them is run on the photographs bundled with the service (service/serving/golden_images/)
and must answer with finite logits, one per label. Either way the check runs through the
version's own batcher, exactly as traffic will.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np

from service.core.metadata import GOLDEN_KEY, ModelMetadata


class GoldenCheckFailed(RuntimeError):
    """The version answered its golden inputs wrongly (the message says which and how)."""


@dataclass(frozen=True)
class GoldenImage:
    name: str
    data: bytes  # encoded image
    top1: int | None  # expected class index, or None: only finite, well-shaped logits are required


def golden_images(metadata: ModelMetadata) -> list[GoldenImage]:
    """The version's own golden images, or the bundled photographs when it carries none."""
    raw = metadata.extra.get(GOLDEN_KEY)
    if raw:
        entries = json.loads(raw)
        return [GoldenImage(str(e["name"]), base64.b64decode(e["image"]), int(e["top1"])) for e in entries]
    folder = resources.files("service.serving") / "golden_images"
    return [
        GoldenImage(item.name, item.read_bytes(), None)
        for item in sorted(folder.iterdir(), key=lambda i: i.name)
        if item.name.endswith(".jpg")
    ]


async def check_golden(metadata: ModelMetadata, classify: Callable[[bytes], Awaitable[np.ndarray]]) -> list[str]:
    """Run every golden image through ``classify`` (bytes -> logits (K,)); returns one line per image
    checked, or raises GoldenCheckFailed naming the first image that failed and why."""
    report = []
    for image in golden_images(metadata):
        logits = np.asarray(await classify(image.data))
        if logits.shape != (metadata.num_classes,):
            raise GoldenCheckFailed(
                f"golden image {image.name}: logits of shape {logits.shape}, expected ({metadata.num_classes},)"
            )
        if not np.isfinite(logits).all():
            raise GoldenCheckFailed(f"golden image {image.name}: non-finite logits (NaN or inf)")
        top1 = int(logits.argmax())
        if image.top1 is not None and top1 != image.top1:
            raise GoldenCheckFailed(
                f"golden image {image.name}: top-1 is class {top1} ({metadata.labels[top1]!r}), expected "
                f"{image.top1} ({metadata.labels[image.top1]!r})"
            )
        report.append(f"{image.name}: top-1 {top1}")
    return report
