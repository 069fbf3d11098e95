"""Fixtures for the service tests: a small real ONNX ViT, fake engines, real photos as bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.core.metadata import ModelMetadata, Preprocessing
from service.runtime.engine_protocol import HostEngine

TINY_LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def export_tiny_vit(
    path: Path,
    *,
    image_size: int = 32,
    preprocessing: Preprocessing | None = None,
    seed: int = 0,
    depth: int = 2,
    embed_dim: int = 32,
    patch_size: int = 8,
):
    """Export a random ViT (tiny by default) with model.export's public function; returns the torch model.

    The head is re-initialised with random weights: the paper's zero head would give all-equal
    logits and make every prediction test vacuous.
    """
    import torch

    from model.config import ViTConfig
    from model.export import export_model
    from model.vit import build_vit

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=2,
        mlp_dim=2 * embed_dim,
        num_classes=len(TINY_LABELS),
        name=f"vit_test_patch{patch_size}_{image_size}",
    )
    model = build_vit(config).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=1.0)
        torch.nn.init.normal_(model.head.bias, std=0.1)
    export_model(
        model,
        config,
        path,
        labels=TINY_LABELS,
        preprocessing=preprocessing or Preprocessing.timm_eval(image_size, 0.875, "bicubic"),
        source="random-test-weights",
    )
    return model


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """(path of the exported .onnx, the PyTorch model it came from)."""
    path = tmp_path_factory.mktemp("models") / "tiny_vit.onnx"
    model = export_tiny_vit(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_onnx(tiny_vit) -> Path:
    return tiny_vit[0]


def photo_bytes(name: str, fmt: str = "JPEG", **save_kwargs) -> bytes:
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, fmt, **save_kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return {name: photo_bytes(name) for name in PHOTOS}


class FakeEngine(HostEngine):
    """Stands in for service.runtime.engine.Engine: deterministic logits, records every batch size.

    Args:
        num_classes: K.
        image_size: side of the expected input.
        delay_s: how long each run takes (simulates inference so requests can pile up).
        fail_when: a predicate on the batch; True -> run raises (to test error isolation).
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32, delay_s: float = 0.0, fail_when=None) -> None:
        self.metadata = ModelMetadata(
            architecture="fake_vit",
            labels=tuple(f"class{i}" for i in range(num_classes)),
            preprocessing=Preprocessing.timm_eval(image_size, 0.875, "bilinear"),
        )
        self.delay_s = delay_s
        self.fail_when = fail_when
        self.batch_sizes: list[int] = []
        self.warmed: list[int] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        import time

        self.batch_sizes.append(batch.shape[0])
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_when is not None and self.fail_when(batch):
            raise RuntimeError("fake engine failure")
        # logits: class i scores the mean of the image + i; the first pixel marks the image in tests
        k = self.metadata.num_classes
        means = batch.reshape(batch.shape[0], -1).mean(axis=1, dtype=np.float64)
        return (means[:, None] + np.arange(k)[None, :] * 0.1 + batch[:, 0, 0, :1]).astype(np.float32)

    def warmup(self, batch_sizes) -> dict[int, float]:
        self.warmed.extend(batch_sizes)
        return {n: 0.0 for n in batch_sizes}

    def describe(self) -> dict:
        return {"providers": ["FakeProvider"], "placement": {}}


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_fake_engine():
    """The FakeEngine class, as a fixture (test modules do not import conftest directly)."""
    return FakeEngine


@pytest.fixture(scope="session")
def encode_photo():
    return photo_bytes
