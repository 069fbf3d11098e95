"""The bundled demo model (models/digits/): accuracy on held-out digits, and checkpoint/ONNX agreement.

The held-out digits are rendered from scikit-learn's data by the same code that rendered the
training images, then go through the service's own preprocessing and ONNX Runtime, exactly as
`make run` serves the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from scripts.digits_data import digits_split, heldout_digit_pixels
from service.core.metadata import ModelMetadata

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = Path("models/digits")  # relative: it is the source recorded in the committed ONNX metadata
MAX_BYTES = 5 * 1024**2


def read_metadata(path: Path) -> ModelMetadata:
    model = onnx.load(str(path), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})


def run_onnx(path: Path, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels})[0]


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, 32, 32) service-preprocessed held-out digits and their labels."""
    metadata = read_metadata(REPO / DEMO_DIR / "model.onnx")
    return heldout_digit_pixels(metadata.preprocessing)


def test_demo_files_are_small_and_carry_labels_and_preprocessing():
    directory = REPO / DEMO_DIR
    for name in ("model.onnx", "model.safetensors", "vitserve.json", "README.md"):
        assert (directory / name).is_file(), name
    assert (directory / "model.safetensors").stat().st_size < MAX_BYTES
    assert (directory / "model.onnx").stat().st_size < MAX_BYTES
    assert not (directory / "model.onnx.data").exists()
    metadata = read_metadata(directory / "model.onnx")
    assert metadata.labels == tuple(str(d) for d in range(10))
    assert metadata.precision == "fp32" and metadata.input_dtype == "float32"
    p = metadata.preprocessing
    assert (p.image_size, p.resize_size, p.resize_mode) == (32, 32, "shortest")
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5)


def test_demo_model_was_trained_without_the_heldout_split():
    """The recorded training set is the training split only (its size adds up; the held-out fifth is not in it)."""
    document = json.loads((REPO / DEMO_DIR / "vitserve.json").read_text())
    record = document["extra"]["finetune"]
    _, _, train, held = digits_split()
    assert record["num_train"] + record["num_val"] == len(train) == 1797 - len(held)
    assert record["mode"] == "full" and document["source"].startswith("random:")


def test_heldout_accuracy_through_the_onnx_file_is_at_least_97_percent(heldout):
    pixels, targets = heldout
    logits = run_onnx(REPO / DEMO_DIR / "model.onnx", pixels)
    labels = read_metadata(REPO / DEMO_DIR / "model.onnx").labels
    predicted = np.array([int(labels[k]) for k in logits.argmax(axis=1)])
    accuracy = float(np.mean(predicted == targets))
    assert len(targets) >= 350
    assert accuracy >= 0.97, f"held-out accuracy {accuracy:.4f} on {len(targets)} digits"
    readme = (REPO / DEMO_DIR / "README.md").read_text()
    assert f"**{accuracy:.2%}** ({int(np.sum(predicted == targets))}/{len(targets)}" in readme  # the figure it states


def test_readme_names_the_committed_weights():
    import hashlib

    digest = hashlib.sha256((REPO / DEMO_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert digest in (REPO / DEMO_DIR / "README.md").read_text()


@pytest.mark.slow
def test_committed_onnx_matches_a_fresh_export_of_the_committed_checkpoint(heldout, tmp_path, monkeypatch):
    """Re-export the checkpoint: same metadata, same logits (so checkpoint and ONNX never drift apart)."""
    from model.export import export_checkpoint

    monkeypatch.chdir(REPO)  # the committed file records the relative source "models/digits"
    fresh, _ = export_checkpoint(str(DEMO_DIR), tmp_path / "fresh.onnx", precision="fp32", verify=False)
    committed = REPO / DEMO_DIR / "model.onnx"
    assert read_metadata(fresh.path) == read_metadata(committed)
    rng = np.random.default_rng(0)
    inputs = np.concatenate([heldout[0][:64], rng.normal(size=(8, 3, 32, 32)).astype(np.float32)])
    np.testing.assert_allclose(run_onnx(fresh.path, inputs), run_onnx(committed, inputs), rtol=0, atol=1e-4)
