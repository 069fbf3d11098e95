"""A hybrid (R26+ViT-S/32) exported by `model.export` and served by `vitserve serve` with no special case:
top-5 on photographs equals PyTorch's."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model.config import config_from_name
from model.export import export_model
from model.vit import VisionTransformer
from service.core.metadata import Preprocessing
from service.runtime.preprocess import load_pixels

pytestmark = pytest.mark.slow

LABELS = [f"class {i}" for i in range(10)]


def test_served_top5_on_photographs_equals_pytorchs(tmp_path, start_service, photo_arrays):
    config = config_from_name("vit_small_r26_s32_224", depth=2, num_classes=len(LABELS))
    torch.manual_seed(0)
    model = VisionTransformer(config).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    torch.nn.init.normal_(model.head.weight, std=0.2)
    preprocessing = Preprocessing.timm_eval(224, 0.9, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    path = tmp_path / "r26.onnx"
    export_model(model, config, path, labels=LABELS, preprocessing=preprocessing, source="tests:r26")

    service = start_service(path)
    info = httpx.get(f"{service.url}/v1/models", timeout=30)
    assert info.status_code == 200 and "vit_small_r26_s32_224" in info.text

    for name, array in photo_arrays.items():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        data = buffer.getvalue()
        r = httpx.post(
            f"{service.url}/v1/classify?top_k=5", content=data, headers={"Content-Type": "image/png"}, timeout=60
        )
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        pixels = torch.from_numpy(load_pixels(data, preprocessing, max_pixels=1 << 26))[None]
        with torch.no_grad():
            expected = torch.softmax(model(pixels), -1)[0].numpy()
        top5 = np.argsort(-expected)[:5]
        assert [p["index"] for p in predictions] == top5.tolist(), name
        assert [p["label"] for p in predictions] == [LABELS[i] for i in top5]
        np.testing.assert_allclose([p["probability"] for p in predictions], expected[top5], atol=1e-4)
