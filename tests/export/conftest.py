"""Session fixtures for tests/export: the tiny model exported once per precision, and a fixed input set."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_testlib import export, make_model

from model.export import torch_to_onnx
from model.verify import photo_inputs, random_inputs
from model.vit import VisionTransformer
from service.core.metadata import Preprocessing


@pytest.fixture(scope="session")
def tiny_model() -> VisionTransformer:
    return make_model()


@pytest.fixture(scope="session")
def exports(tiny_model, tmp_path_factory) -> dict:
    """precision -> ExportResult, one export each for the whole session."""
    root = tmp_path_factory.mktemp("exports")
    return {p: export(tiny_model, root / f"tiny_{p}.onnx", p) for p in ("fp32", "fp16", "int8")}


@pytest.fixture(scope="session")
def fixed_inputs() -> np.ndarray:
    """The fixed input set: 8 seeded random-normal images and 4 skimage photographs, (12, 3, 224, 224)."""
    return np.concatenate([random_inputs(224, 8, seed=1), photo_inputs(Preprocessing.timm_eval(224))])


@pytest.fixture(scope="session")
def torch_logits(tiny_model, fixed_inputs) -> np.ndarray:
    with torch.no_grad():
        return tiny_model(torch.from_numpy(fixed_inputs)).numpy()


@pytest.fixture(scope="session")
def unfused_graph(tiny_model) -> onnx.ModelProto:
    """The same model exported through its explicit softmax attention: MatMul-Softmax-MatMul per block."""
    tiny_model.set_explicit_attention(True)
    try:
        return torch_to_onnx(tiny_model, tiny_model.config)
    finally:
        tiny_model.set_explicit_attention(False)
