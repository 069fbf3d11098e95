"""Bad checkpoints raise one clear CheckpointError naming the file, key or shape, never a half-loaded model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, import_checkpoint
from model.config import config_from_name
from model.vit import VisionTransformer

NAME, ARGS = "vit_tiny_patch16_224", {"depth": 2}


@pytest.fixture(scope="module")
def state_dict():
    """A timm-named state dict (ours are timm's names), tiny: the point is the error, not the model."""
    torch.manual_seed(0)
    return {
        k: v.clone() for k, v in VisionTransformer(config_from_name(NAME, depth=2, num_classes=4)).state_dict().items()
    }


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_truncated_safetensors(state_dict, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(state_dict, str(path))
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint file .*w\.safetensors"):
        import_checkpoint(truncate(path), model_name=NAME, model_args=ARGS)


def test_truncated_pth(state_dict, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint file .*w\.pth"):
        import_checkpoint(truncate(path), model_name=NAME, model_args=ARGS)


def test_truncated_npz(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(
        path, **{"embedding/kernel": np.zeros((16, 16, 3, 192), np.float32), "cls": np.zeros((1, 1, 192), np.float32)}
    )
    with pytest.raises(CheckpointError, match=r"cannot read \.npz checkpoint .*w\.npz"):
        import_checkpoint(truncate(path, 0.7), model_name=NAME, model_args=ARGS)


def test_truncated_weights_in_a_hugging_face_dir(tmp_path):
    import transformers

    model = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3
        )
    )
    model.save_pretrained(tmp_path)
    truncate(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        import_checkpoint(tmp_path)


def test_wrong_shape_names_key_expected_and_got(state_dict, tmp_path):
    bad = dict(state_dict)
    bad["blocks.1.attn.qkv.weight"] = bad["blocks.1.attn.qkv.weight"][:, :100].contiguous()
    save_file(bad, str(tmp_path / "w.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"blocks\.1\.attn\.qkv\.weight \(expected \(576, 192\), got \(576, 100\)\)"
    ):
        import_checkpoint(tmp_path / "w.safetensors", model_name=NAME, model_args=ARGS)


def test_wrong_architecture_name(state_dict, tmp_path):
    save_file(state_dict, str(tmp_path / "w.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"patch_embed\.proj\.weight \(expected \(384, 3, 16, 16\), got \(192, 3, 16, 16\)\)"
    ):
        import_checkpoint(tmp_path / "w.safetensors", model_name="vit_small_patch16_224", model_args=ARGS)


def test_foreign_and_missing_keys_are_listed(state_dict, tmp_path):
    bad = dict(state_dict)
    bad["blocks.0.ls1.gamma"] = torch.ones(192)  # LayerScale: a feature this model does not have
    del bad["norm.bias"]
    torch.save(bad, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as info:
        import_checkpoint(tmp_path / "w.pth", model_name=NAME, model_args=ARGS)
    assert "missing keys: norm.bias" in str(info.value) and "unexpected keys: blocks.0.ls1.gamma" in str(info.value)


def test_depth_mismatch_lists_the_extra_blocks(state_dict, tmp_path):
    torch.save(state_dict, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\.norm1\.weight, .*blocks\.2\.mlp\.fc2\.bias$"):
        import_checkpoint(tmp_path / "w.pth", model_name=NAME, model_args={"depth": 3})


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*nope\.safetensors"):
        import_checkpoint(tmp_path / "nope.safetensors", model_name=NAME)
    with pytest.raises(CheckpointError, match=r"not found: .*nowhere"):
        import_checkpoint(tmp_path / "nowhere")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CheckpointError, match=r"has none of model\.safetensors, pytorch_model\.bin"):
        import_checkpoint(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="neither vitserve.json"):
        import_checkpoint(tmp_path)


def test_bare_state_dict_needs_its_architecture(state_dict, tmp_path):
    save_file(state_dict, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="pass model_name="):
        import_checkpoint(tmp_path / "w.safetensors")


def test_unsupported_sources(tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint scheme 's3'"):
        import_checkpoint("s3:bucket/model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deit"}))
    save_file({}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model_type 'deit'"):
        import_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="init_values=1e-05"):
        import_checkpoint("random:vit_tiny_patch16_224", model_args={"init_values": 1e-5})
    with pytest.raises(CheckpointError, match="unsupported architecture 'vit_base_patch16_clip_224'"):
        import_checkpoint("random:vit_base_patch16_clip_224")


def test_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)
