"""A Hugging Face ViT exported with plain ``torch.onnx.export`` (no vitserve metadata) served by a real
server: with flags, and after ``vitserve export --from-onnx`` (from a sidecar JSON) with no flags.

The reference is transformers' own: ViTImageProcessor pre-processing and the PyTorch model, on
photographs from skimage.data.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import free_port, stop_server, wait_ready
from PIL import Image

from service.cli import main as cli_main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
LABELS = ("tench", "goldfish", "shark", "hen", "ostrich", "finch", "junco", "bunting", "robin", "bulbul")
HF_FLAGS = ["--resize-mode", "squash", "--interpolation", "bilinear", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    """(ONNX file without metadata (weights may sit in <file>.data next to it), its config.json with
    id2label, reference top-5 and probabilities per photo)."""
    import skimage.data
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # a random head of std 0.02 gives near-tied logits; spread them out
        torch.nn.init.normal_(model.classifier.weight, std=1.0)
    config.save_pretrained(folder)  # config.json: the labels file a user of this model has

    class Logits(torch.nn.Module):
        def __init__(self, vit) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, pixel_values):
            return self.vit(pixel_values=pixel_values).logits

    path = folder / "hf_vit.onnx"
    torch.onnx.export(
        Logits(model).eval(),
        (torch.randn(2, 3, 32, 32),),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    processor = ViTImageProcessor(
        size={"height": 32, "width": 32}, resample=Image.Resampling.BILINEAR, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    photos, reference = {}, {}
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "PNG")
        photos[name] = buf.getvalue()
        pixels = processor(images=Image.open(io.BytesIO(photos[name])).convert("RGB"), return_tensors="pt")[
            "pixel_values"
        ]
        with torch.no_grad():
            probabilities = model(pixel_values=pixels).logits.softmax(-1)[0].numpy()
        top5 = np.argsort(-probabilities)[:5]
        reference[name] = ([LABELS[i] for i in top5], probabilities[top5])
    return path, folder / "config.json", photos, reference


class Server:
    """``vitserve serve --model MODEL [flags]`` on 127.0.0.1 in a subprocess, stopped with SIGTERM."""

    def __init__(self, model: Path, extra: list[str], log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                self.url.rsplit(":", 1)[1],
                "--max-batch-size",
                "4",
                "--intra-op-threads",
                "1",
                "--preprocess-threads",
                "2",
                "--log-level",
                "info",
                *extra,
            ],
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(self.url, self.process, log_path)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def classify(self, data: bytes) -> list[dict]:
        response = httpx.post(
            f"{self.url}/v1/classify",
            params={"top_k": 5},
            content=data,
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return response.json()["predictions"]

    def stop(self) -> None:
        stop_server(self.process)
        self._log.close()


def _assert_same_top5(server: Server, photos: dict[str, bytes], reference: dict) -> None:
    for name, data in photos.items():
        predictions = server.classify(data)
        labels, probabilities = reference[name]
        assert [p["label"] for p in predictions] == labels, name
        np.testing.assert_allclose([p["probability"] for p in predictions], probabilities, atol=2e-4)


def test_plain_torch_export_served_with_flags_matches_transformers(hf_vit, tmp_path):
    model, config_json, photos, reference = hf_vit
    server = Server(model, [*HF_FLAGS, "--labels", str(config_json)], tmp_path / "server.log")
    try:
        _assert_same_top5(server, photos, reference)
        spec = httpx.get(f"{server.url}/v1/models", timeout=10).json()["spec"]
    finally:
        server.stop()
    assert {k: spec[k]["source"] for k in ("mean", "std", "labels", "resize_mode", "interpolation")} == dict.fromkeys(
        ("mean", "std", "labels", "resize_mode", "interpolation"), "flag"
    )
    assert spec["image_size"] == {"value": 32, "source": "graph"}
    assert spec["resize"] == {"value": 32, "source": "default"} and spec["name"]["value"] == "hf_vit"
    log = server.log_path.read_text()
    assert "model spec, value (source): name=hf_vit (default); image_size=32 (graph)" in log
    assert "mean=0.5,0.5,0.5 (flag)" in log and "labels=10 (flag)" in log


def test_sidecar_then_export_from_onnx_is_served_with_no_flags(hf_vit, tmp_path, capsys):
    model, config_json, photos, reference = hf_vit
    source = tmp_path / "from_hub.onnx"
    shutil.copyfile(model, source)
    if model.with_name(model.name + ".data").exists():  # torch.onnx.export keeps weights in <file>.data
        shutil.copyfile(model.with_name(model.name + ".data"), tmp_path / (model.name + ".data"))
    shutil.copyfile(config_json, tmp_path / "config.json")
    (tmp_path / "from_hub.onnx.json").write_text(
        json.dumps(
            {
                "name": "hub_vit",
                "resize_mode": "squash",
                "interpolation": "bilinear",
                "mean": [0.5, 0.5, 0.5],
                "std": "inception",
                "labels": "config.json",
            }
        )
    )
    ours = tmp_path / "embedded" / "hub_vit.onnx"
    assert cli_main(["export", "--from-onnx", str(source), "-o", str(ours)]) == 0, capsys.readouterr().err
    assert "needs no flags now" in capsys.readouterr().out
    assert cli_main(["inspect", str(ours), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vitserve_metadata_missing"] == [] and summary["softmax_nodes"] == 2
    assert summary["fused_attention_total"] == 0 and summary["precision"] == "fp32"
    server = Server(ours, [], tmp_path / "server.log")  # no flags, no sidecar next to the copy
    try:
        _assert_same_top5(server, photos, reference)
        described = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    finally:
        server.stop()
    assert described["name"] == "hub_vit" and described["labels"] == list(LABELS)
    assert {described["spec"][k]["source"] for k in ("mean", "std", "labels", "resize", "interpolation")} == {
        "metadata"
    }
