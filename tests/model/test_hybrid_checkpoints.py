"""The paper's hybrid (R+ViT): built exactly as timm's, imported from timm, the paper's .npz and Hugging Face's
ViTHybrid layout, its BiT backbone equal to transformers' BitBackbone, and bad checkpoints named."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from checkpoint_testlib import PARITY_ATOL, max_abs_diff, photo_batch
from hybrid_testlib import HF_PREFIX, SMALL, timm_hybrid, to_hf_layout, write_hf_hybrid_dir, write_hybrid_npz
from safetensors.torch import save_file
from timm.models import save_for_hf

from model.checkpoint import CheckpointError, import_checkpoint
from model.config import VARIANTS, config_from_name
from model.hybrid import ResNetV2
from model.vit import VisionTransformer

FEATURE_ATOL = 1e-5  # the backbone's feature map, fp32


def backbone_map(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.patch_embed.backbone(x)


@pytest.mark.parametrize("name", list(SMALL))
def test_logits_and_feature_map_equal_timms(name, tmp_path, photo_arrays):
    ref = timm_hybrid(name, **SMALL[name])
    save_file(ref.state_dict(), str(tmp_path / "weights.safetensors"))
    loaded = import_checkpoint(
        tmp_path / "weights.safetensors", model_name=name, model_args={"depth": SMALL[name]["depth"]}
    )
    assert loaded.config.backbone_layers == config_from_name(name).backbone_layers
    x = photo_batch(photo_arrays, 224)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), ref(x)) <= PARITY_ATOL
    assert max_abs_diff(backbone_map(loaded.model, x), backbone_map(ref, x)) <= FEATURE_ATOL


def test_another_resolution_resamples_pos_embed_as_timm_does(tmp_path, photo_arrays):
    """R26+ViT-S/32 weights of 224 (7 x 7 grid) run at 384 (12 x 12), as timm's checkpoint_filter_fn resamples."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    name = "vit_small_r26_s32_224"
    ref = timm_hybrid(name, **SMALL[name])
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    ours = import_checkpoint(tmp_path / "w.safetensors", model_name=name, model_args={"depth": 2}, image_size=384)
    assert ours.config.grid_size == 12 and ours.model.pos_embed.shape == (1, 145, 384)
    at_384 = timm.create_model(name, img_size=384, **SMALL[name]).eval()
    at_384.load_state_dict(checkpoint_filter_fn(ref.state_dict(), at_384))
    x = photo_batch(photo_arrays, 384, names=("coffee", "rocket"))
    with torch.no_grad():
        assert max_abs_diff(ours.model(x), at_384(x)) <= PARITY_ATOL


@pytest.mark.slow
def test_the_papers_r50_vit_b16_at_384_equals_timm(tmp_path, photo_arrays):
    """The full R50+ViT-B/16 at 384 (577 tokens), from a timm hub directory."""
    ref = timm_hybrid("vit_base_r50_s16_384", num_classes=1000)
    save_for_hf(ref, str(tmp_path), safe_serialization=True)
    loaded = import_checkpoint(tmp_path)
    assert loaded.config.name == "vit_base_r50_s16_384" and loaded.config.grid_size == 24
    assert loaded.model.pos_embed.shape == (1, 577, 768)
    x = photo_batch(photo_arrays, 384, names=("astronaut", "chelsea"))
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), ref(x)) <= PARITY_ATOL
    assert max_abs_diff(backbone_map(loaded.model, x), backbone_map(ref, x)) <= FEATURE_ATOL


@pytest.mark.parametrize("name", [v for v in VARIANTS if "_r" in v])
def test_every_hybrid_variant_has_timms_parameter_count(name):
    with torch.device("meta"):
        ours = sum(p.numel() for p in VisionTransformer(config_from_name(name)).parameters())
        theirs = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
    assert ours == theirs


def test_paper_names_and_the_r_ti_grid():
    assert config_from_name("R50+ViT-B/16@384") == config_from_name("vit_base_r50_s16_384")
    tiny = config_from_name("vit_tiny_r_s16_p8_224")  # "s16" in the name, stride 32 in fact: stem /4, patches of 8
    assert tiny.backbone_layers == () and tiny.grid_size == 7 and tiny.feature_dim == 64
    assert config_from_name("vit_base_r50_s16_384").num_patches == 576


def test_npz_in_the_papers_layout_reads_as_timm_reads_it(tmp_path, photo_arrays):
    for name in ("vit_tiny_r_s16_p8_224", "vit_small_r26_s32_224"):
        ref = timm_hybrid(name, **SMALL[name])
        path = write_hybrid_npz(ref, tmp_path / f"{name}.npz")
        by_timm = timm.create_model(name, **SMALL[name]).eval()
        timm.models.load_checkpoint(by_timm, str(path))  # timm's own reader vouches for the writer
        ours = import_checkpoint(path, model_name=name, model_args={"depth": SMALL[name]["depth"]})
        x = photo_batch(photo_arrays, 224)
        with torch.no_grad():
            assert max_abs_diff(by_timm(x), ref(x)) <= FEATURE_ATOL
            assert max_abs_diff(ours.model(x), by_timm(x)) <= FEATURE_ATOL


def test_hf_vit_hybrid_directory_round_trips_to_timms_state_dict_bit_for_bit(tmp_path):
    ref = timm_hybrid("vit_base_r50_s16_224", **SMALL["vit_base_r50_s16_224"])
    loaded = import_checkpoint(write_hf_hybrid_dir(ref, tmp_path / "hf"))
    # One block, so not a named variant: the name says what it is.
    assert loaded.config.name == "vit_d768_l1_h12_r3_4_9_p1_224" and loaded.config.backbone_layers == (3, 4, 9)
    assert loaded.config.norm_eps == 1e-12  # ViTHybridConfig's default, not timm's 1e-6
    assert loaded.labels == tuple(f"thing {i}" for i in range(6))
    ours, theirs = loaded.model.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # ViTHybridImageProcessor's defaults: shortest side, centre crop, bicubic.
    assert loaded.preprocessing.resize_mode == "shortest" and loaded.preprocessing.image_size == 224


def test_hf_layer_norm_eps_is_honoured(tmp_path, photo_arrays):
    ref = timm_hybrid("vit_base_r50_s16_224", **SMALL["vit_base_r50_s16_224"])
    loaded = import_checkpoint(write_hf_hybrid_dir(ref, tmp_path / "hf", layer_norm_eps=1e-6))
    assert loaded.config.norm_eps == 1e-6
    x = photo_batch(photo_arrays, 224)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), ref(x)) <= PARITY_ATOL


def test_our_backbone_equals_transformers_bit_backbone(photo_arrays):
    from transformers import BitBackbone, BitConfig

    ours = timm_hybrid("vit_base_r50_s16_224", **SMALL["vit_base_r50_s16_224"])  # timm's weights...
    backbone = ResNetV2((3, 4, 9), 3)
    backbone.load_state_dict(
        {k[len("patch_embed.backbone.") :]: v for k, v in ours.state_dict().items() if "backbone" in k}
    )
    backbone.eval()
    bit = BitBackbone(
        BitConfig(
            global_padding="same",
            layer_type="bottleneck",
            depths=(3, 4, 9),
            out_features=["stage3"],
            embedding_dynamic_padding=True,
        )
    ).eval()
    hf = {k[len(HF_PREFIX) :]: v for k, v in to_hf_layout(ours.state_dict()).items() if k.startswith(HF_PREFIX)}
    bit.load_state_dict(hf, strict=True)  # ...in transformers' names, every one used
    x = photo_batch(photo_arrays, 224)
    with torch.no_grad():
        expected = bit(x).feature_maps[0]
        assert expected.shape == (3, 1024, 14, 14)
        assert max_abs_diff(backbone(x), expected) <= FEATURE_ATOL


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: one CheckpointError that names the problem


@pytest.fixture
def r26_weights() -> dict[str, torch.Tensor]:
    return dict(timm_hybrid("vit_small_r26_s32_224", **SMALL["vit_small_r26_s32_224"]).state_dict())


def load_r26(tmp_path, state_dict, name="vit_small_r26_s32_224"):
    save_file(state_dict, str(tmp_path / "w.safetensors"))
    return import_checkpoint(tmp_path / "w.safetensors", model_name=name, model_args={"depth": 2})


def test_a_missing_backbone_stage_is_named(tmp_path, r26_weights):
    kept = {k: v for k, v in r26_weights.items() if ".backbone.stages.1." not in k}
    with pytest.raises(CheckpointError, match=r"backbone stage\(s\) 1 missing \(found stages 0, 2, 3"):
        load_r26(tmp_path, kept)


def test_a_wrong_stage_count_is_named(tmp_path, r26_weights):
    """R26 weights (4 stages) given as R50+ViT-B/16's 3-stage backbone, or a stage with a block too few."""
    with pytest.raises(CheckpointError, match=r"the backbone has 4 stage\(s\) with blocks \(2, 2, 2, 2\), "):
        load_r26(tmp_path, r26_weights, name="vit_base_r50_s16_224")
    three = {k: v for k, v in r26_weights.items() if ".backbone.stages.3." not in k}
    with pytest.raises(CheckpointError, match=r"has 3 stage\(s\).*vit_small_r26_s32_224 has 4"):
        load_r26(tmp_path, three)
    short = {k: v for k, v in r26_weights.items() if ".backbone.stages.2.blocks.1." not in k}
    with pytest.raises(CheckpointError, match=r"backbone stage 2 has blocks \[0\], vit_small_r26_s32_224 has 2"):
        load_r26(tmp_path, short)


def test_plain_and_hybrid_weights_are_not_confused(tmp_path, r26_weights):
    with pytest.raises(CheckpointError, match=r"hybrid's weights \(patch_embed.backbone.\*\) but vit_small_patch32"):
        load_r26(tmp_path, r26_weights, name="vit_small_patch32_224")
    plain = {k: v for k, v in r26_weights.items() if not k.startswith("patch_embed.backbone.")}
    with pytest.raises(CheckpointError, match="no patch_embed.backbone.* weights, but vit_small_r26_s32_224 is a"):
        load_r26(tmp_path, plain)


def test_a_truncated_hybrid_file_is_named(tmp_path, r26_weights):
    for suffix, write in (
        (".safetensors", lambda p: save_file(r26_weights, str(p))),
        (".pth", lambda p: torch.save(r26_weights, p)),
        (".npz", lambda p: write_hybrid_npz(timm_hybrid("vit_small_r26_s32_224", **SMALL["vit_small_r26_s32_224"]), p)),
    ):
        path = tmp_path / f"r26{suffix}"
        write(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"r26{suffix}.*truncated"):
            import_checkpoint(path, model_name="vit_small_r26_s32_224", model_args={"depth": 2})


def test_a_hybrid_npz_missing_a_unit_is_named(tmp_path):
    path = write_hybrid_npz(timm_hybrid("vit_small_r26_s32_224", **SMALL["vit_small_r26_s32_224"]), tmp_path / "a.npz")
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files if not k.startswith("block3/")}
    np.savez(tmp_path / "b.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"backbone stage\(s\) 2 missing"):
        import_checkpoint(tmp_path / "b.npz", model_name="vit_small_r26_s32_224", model_args={"depth": 2})


def test_hf_backbone_this_importer_does_not_build_is_refused(tmp_path):
    import json

    ref = timm_hybrid("vit_base_r50_s16_224", **SMALL["vit_base_r50_s16_224"])
    directory = write_hf_hybrid_dir(ref, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["backbone_config"]["layer_type"] = "preactivation"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layer_type='preactivation' \(need 'bottleneck'\)"):
        import_checkpoint(directory)
