"""vitserve's native checkpoint (vitserve.json + model.safetensors) and the random: source."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_testlib import max_abs_diff, photo_batch, randomize

from model.checkpoint import CheckpointError, import_checkpoint, load_native, state_dict_sha256
from model.config import config_from_name
from model.native import save_native
from model.vit import VisionTransformer
from service.core.metadata import Preprocessing

LABELS = ("cat", "dog", "fish")


@pytest.fixture
def saved(tmp_path):
    config = config_from_name("S/32", depth=2, num_classes=3)
    model = randomize(VisionTransformer(config), seed=7)
    prep = Preprocessing.timm_eval(224, crop_pct=0.95, interpolation="bilinear")
    directory = save_native(
        tmp_path / "ckpt",
        model,
        config,
        LABELS,
        prep,
        source="timm:vit_small_patch32_224",
        extra={"epochs": 3, "dataset": "pets"},
    )
    return directory, model, config, prep


def test_round_trip(saved, photo_arrays):
    directory, model, config, prep = saved
    loaded = load_native(directory)
    assert loaded.config == config and loaded.labels == LABELS and loaded.preprocessing == prep
    assert loaded.source == str(directory) and loaded.origin == "timm:vit_small_patch32_224"
    assert loaded.extra == {"epochs": 3, "dataset": "pets"}
    assert loaded.weights_sha256 == state_dict_sha256(model.state_dict())
    x = photo_batch(photo_arrays, 224)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), model(x)) == 0.0
    document = json.loads((directory / "vitserve.json").read_text())
    assert (document["format"], document["version"]) == ("vitserve-checkpoint", 1)
    assert document["config"] == config.to_dict() and document["labels"] == list(LABELS)


def test_import_checkpoint_reads_native_dirs_with_the_usual_options(saved):
    directory, model, config, _ = saved
    same = import_checkpoint(directory)
    assert same.weights_sha256 == load_native(directory).weights_sha256
    bigger = import_checkpoint(directory, image_size=288, num_classes=5)
    assert bigger.config.image_size == 288 and bigger.config.num_classes == 5
    assert bigger.preprocessing.image_size == 288 and bigger.preprocessing.resize_size == int(288 / 0.95)
    assert bigger.labels == tuple(f"class_{i}" for i in range(5))


def test_save_native_refuses_inconsistent_inputs(saved, tmp_path):
    _, model, config, prep = saved
    with pytest.raises(ValueError, match="2 label names for a head with 3 classes"):
        save_native(tmp_path / "a", model, config, LABELS[:2], prep)
    with pytest.raises(CheckpointError, match=r"head\.weight \(expected \(10, 384\), got \(3, 384\)\)"):
        save_native(tmp_path / "b", model, config.replace(num_classes=10), [str(i) for i in range(10)], prep)
    with pytest.raises(TypeError):
        save_native(tmp_path / "c", model, config, LABELS, prep, extra={"not json": object()})
    assert not (tmp_path / "c" / "model.safetensors").exists()


def test_bad_native_dirs(saved):
    directory, *_ = saved
    document = json.loads((directory / "vitserve.json").read_text())
    (directory / "vitserve.json").write_text(json.dumps({**document, "version": 2}))
    with pytest.raises(CheckpointError, match="unsupported version 2"):
        load_native(directory)
    (directory / "vitserve.json").write_text(json.dumps({**document, "labels": ["one"]}))
    with pytest.raises(CheckpointError, match="'labels' must list 3 names"):
        load_native(directory)
    (directory / "vitserve.json").write_text(json.dumps(document))
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"not found: .*model\.safetensors"):
        load_native(directory)


def test_random_source_is_reproducible_and_not_degenerate(photo_arrays):
    a = import_checkpoint("random:Ti/16", model_args={"depth": 1})
    b = import_checkpoint("random:vit_tiny_patch16_224", model_args={"depth": 1})
    assert a.weights_sha256 == b.weights_sha256
    assert a.labels[0] == "tench, Tinca tinca" and a.preprocessing == Preprocessing.timm_eval(224)
    with torch.no_grad():
        logits = a.model(photo_batch(photo_arrays, 224))
    assert logits.shape == (3, 1000) and logits.std() > 0  # a random head, unlike the paper's zero head
    c = import_checkpoint("random:vit_small_patch16_384", model_args={"depth": 1}, num_classes=7)
    assert c.config.image_size == 384 and c.config.num_classes == 7 and len(c.labels) == 7
