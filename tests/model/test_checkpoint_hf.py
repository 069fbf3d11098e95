"""Hugging Face checkpoints: random-weight ViTForImageClassification saved with save_pretrained, imported, compared."""

from __future__ import annotations

import re
from functools import cache

import pytest
import torch
import transformers
from checkpoint_testlib import PARITY_ATOL, max_abs_diff, photo_batch, randomize
from safetensors.torch import save_file

from model.checkpoint import import_checkpoint

# name -> ViTConfig kwargs of transformers; small widths, the point is the mapping, not the size.
CASES = {
    "224-p16": dict(
        image_size=224,
        patch_size=16,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        id2label={i: f"bird {i}" for i in range(5)},
    ),
    "384-p32-eps1e-6": dict(
        image_size=384,
        patch_size=32,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=256,
        num_labels=4,
        layer_norm_eps=1e-6,
    ),
}


@cache
def reference(case: str):
    kwargs = CASES[case]
    config = transformers.ViTConfig(**kwargs)
    return randomize(transformers.ViTForImageClassification(config), seed=len(case))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(case, tmp_path, photo_arrays):
    ref = reference(case)
    ref.save_pretrained(tmp_path)
    loaded = import_checkpoint(tmp_path)

    cfg = ref.config
    assert loaded.config.image_size == cfg.image_size and loaded.config.norm_eps == cfg.layer_norm_eps
    assert (loaded.config.embed_dim, loaded.config.depth, loaded.config.num_heads) == (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
    )
    x = photo_batch(photo_arrays, cfg.image_size)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), logits(ref, x)) <= PARITY_ATOL
    if "id2label" in CASES[case]:
        assert loaded.labels == tuple(f"bird {i}" for i in range(5))
    else:  # transformers' generic LABEL_i names are no names at all
        assert loaded.labels == tuple(f"class_{i}" for i in range(cfg.num_labels))


def test_pytorch_model_bin_and_processor_config(tmp_path, photo_arrays):
    ref = reference("384-p32-eps1e-6")
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    processor = transformers.ViTImageProcessor(
        size={"height": 384, "width": 384},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(tmp_path)
    loaded = import_checkpoint(tmp_path)

    x = photo_batch(photo_arrays, 384)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), logits(ref, x)) <= PARITY_ATOL
    p = loaded.preprocessing
    assert (p.resize_mode, p.image_size, p.resize_size) == ("squash", 384, 384)
    assert p.interpolation == "bicubic"
    assert p.mean == pytest.approx(processor.image_mean) and p.std == pytest.approx(processor.image_std)


def test_without_processor_config_uses_vit_image_processor_defaults(tmp_path):
    reference("224-p16").save_pretrained(tmp_path)
    p = import_checkpoint(tmp_path).preprocessing
    defaults = transformers.ViTImageProcessor()
    assert (p.resize_mode, p.image_size, p.resize_size) == ("squash", defaults.size["height"], defaults.size["width"])
    assert p.interpolation == defaults.resample.name.lower()
    assert p.mean == pytest.approx(defaults.image_mean) and p.std == pytest.approx(defaults.image_std)


# transformers >= 5 names -> the names of transformers 4 and of most files on the hub.
_OLD_NAMES = [
    (r"vit\.layers\.(\d+)\.attention\.q_proj", r"vit.encoder.layer.\1.attention.attention.query"),
    (r"vit\.layers\.(\d+)\.attention\.k_proj", r"vit.encoder.layer.\1.attention.attention.key"),
    (r"vit\.layers\.(\d+)\.attention\.v_proj", r"vit.encoder.layer.\1.attention.attention.value"),
    (r"vit\.layers\.(\d+)\.attention\.o_proj", r"vit.encoder.layer.\1.attention.output.dense"),
    (r"vit\.layers\.(\d+)\.mlp\.fc1", r"vit.encoder.layer.\1.intermediate.dense"),
    (r"vit\.layers\.(\d+)\.mlp\.fc2", r"vit.encoder.layer.\1.output.dense"),
    (r"vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
]


def test_transformers_4_parameter_names(tmp_path, photo_arrays):
    ref = reference("224-p16")
    ref.save_pretrained(tmp_path)
    old = {}
    for key, value in ref.state_dict().items():
        for pattern, repl in _OLD_NAMES:
            key = re.sub(pattern, repl, key)
        old[key] = value.contiguous()
    assert any(".attention.attention.query." in k for k in old)
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    x = photo_batch(photo_arrays, 224)
    # transformers itself reads the old names: it is the reference that the rewrite is right.
    reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert max_abs_diff(logits(reloaded, x), logits(ref, x)) <= PARITY_ATOL
    loaded = import_checkpoint(tmp_path)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), logits(ref, x)) <= PARITY_ATOL


def test_hf_scheme_downloads_the_repo(tmp_path, monkeypatch, photo_arrays):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    ref = reference("224-p16")
    ref.save_pretrained(tmp_path)
    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        if not (tmp_path / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = import_checkpoint("hf:google/vit-base-patch16-224")
    assert {r for r, _ in requested} == {"google/vit-base-patch16-224"}
    assert [f for _, f in requested] == ["config.json", "preprocessor_config.json", "model.safetensors"]
    x = photo_batch(photo_arrays, 224)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), logits(ref, x)) <= PARITY_ATOL


def test_config_of_google_vit_base():
    """The fields of google/vit-base-patch16-224's config.json (as published on the hub)."""
    from model.convert.hf import config_from_hf, labels_from_hf

    config_json = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_act": "gelu",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "image_size": 224,
        "patch_size": 16,
        "num_channels": 3,
        "layer_norm_eps": 1e-12,
        "qkv_bias": True,
        "id2label": {str(i): f"name {i}" for i in range(1000)},
    }
    config = config_from_hf(config_json, where="config.json")
    assert config.name == "vit_base_patch16_224" and config.num_classes == 1000 and config.norm_eps == 1e-12
    assert labels_from_hf(config_json, 1000)[999] == "name 999"
