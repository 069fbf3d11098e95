"""timm checkpoints: random-weight timm models saved in timm's own formats, imported, logits compared."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import timm
import torch
from checkpoint_testlib import PARITY_ATOL, max_abs_diff, photo_batch, randomize
from safetensors.torch import save_file
from timm.models import load_checkpoint, save_for_hf
from timm.models.vision_transformer import checkpoint_filter_fn

from model.checkpoint import CheckpointError, import_checkpoint
from model.labels import imagenet1k_labels

# name -> (timm model name, create_model kwargs): small depth where size is not the point.
CASES = {
    "Ti16-224": ("vit_tiny_patch16_224", dict(depth=2, num_classes=7)),
    "S16-384": ("vit_small_patch16_384", dict(depth=2, num_classes=10)),
    "B32-224": ("vit_base_patch32_224", dict(depth=1, num_classes=5)),
    "avg-fc_norm": ("vit_tiny_patch16_224", dict(depth=2, num_classes=7, global_pool="avg")),
    "gap-no-cls": (
        "vit_small_patch32_224",
        dict(depth=2, num_classes=6, class_token=False, global_pool="avg", fc_norm=False),
    ),
}


@cache
def reference(case: str) -> torch.nn.Module:
    name, kwargs = CASES[case]
    return randomize(timm.create_model(name, pretrained=False, **kwargs), seed=len(case))


def save(model: torch.nn.Module, fmt: str, directory: Path, **hub_kwargs) -> Path:
    """Write the model the way timm users have it on disk."""
    if fmt == "hub":
        save_for_hf(model, str(directory), safe_serialization=True, **hub_kwargs)
        return directory
    if fmt == "safetensors":
        save_file(model.state_dict(), str(directory / "weights.safetensors"))
        return directory / "weights.safetensors"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, directory / "checkpoint.pth")  # a training checkpoint
    return directory / "checkpoint.pth"


@pytest.mark.parametrize("fmt", ["hub", "safetensors", "pth"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_timm(case, fmt, tmp_path, photo_arrays):
    name, kwargs = CASES[case]
    ref = reference(case)
    path = save(ref, fmt, tmp_path)
    # A bare state dict needs its architecture; pooling and K are read from the weights themselves.
    extra = {} if fmt == "hub" else dict(model_name=name, model_args={"depth": kwargs["depth"]})
    loaded = import_checkpoint(path, **extra)

    size = ref.pretrained_cfg["input_size"][-1]
    assert loaded.config.image_size == size and loaded.config.num_classes == kwargs["num_classes"]
    assert loaded.config.pool == kwargs.get("global_pool", "token")
    x = photo_batch(photo_arrays, size)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), ref(x)) <= PARITY_ATOL
    assert not loaded.model.training and next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.labels == tuple(f"class_{i}" for i in range(kwargs["num_classes"]))
    assert loaded.source == str(path)


def test_hub_dir_preprocessing_and_labels_match_timm(tmp_path):
    ref = reference("S16-384")
    names = [f"species {i}" for i in range(10)]
    loaded = import_checkpoint(save(ref, "hub", tmp_path, model_config={"label_names": names}))
    assert loaded.labels == tuple(names)

    # timm's own eval transform for these weights is the reference.
    cfg = timm.data.resolve_data_config({}, model=ref)
    transform = timm.data.create_transform(**cfg, is_training=False)
    resize, crop, _, normalize = transform.transforms
    p = loaded.preprocessing
    assert p.resize_mode == "shortest"
    assert p.resize_size == resize.size and (p.image_size, p.image_size) == tuple(crop.size)
    assert p.interpolation == resize.interpolation.value
    assert p.mean == pytest.approx(normalize.mean.tolist()) and p.std == pytest.approx(normalize.std.tolist())


def test_weights_hash_is_stable_across_formats(tmp_path):
    ref = reference("Ti16-224")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    hub = import_checkpoint(save(ref, "hub", tmp_path / "a"))
    pth = import_checkpoint(
        save(ref, "pth", tmp_path / "b"), model_name="vit_tiny_patch16_224", model_args={"depth": 2}
    )
    assert hub.weights_sha256 == pth.weights_sha256 and len(hub.weights_sha256) == 64
    other = import_checkpoint(save(reference("avg-fc_norm"), "hub", tmp_path / "b"))
    assert other.weights_sha256 != hub.weights_sha256


@pytest.mark.parametrize(("case", "size"), [("Ti16-224", 288), ("gap-no-cls", 160)], ids=["up-cls", "down-gap"])
def test_resampled_to_another_resolution_matches_timm(case, size, tmp_path, photo_arrays):
    """Fine-tuning at another resolution: pos_embed interpolated in 2-D exactly as timm does."""
    name, kwargs = CASES[case]
    hub = save(reference(case), "hub", tmp_path)
    loaded = import_checkpoint(hub, image_size=size)

    timm_resized = timm.create_model(name, **kwargs, img_size=size).eval()
    load_checkpoint(timm_resized, str(hub / "model.safetensors"), filter_fn=checkpoint_filter_fn)
    x = photo_batch(photo_arrays, size)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), timm_resized(x)) <= PARITY_ATOL
    assert loaded.config.image_size == size and loaded.model.pos_embed.shape == timm_resized.pos_embed.shape
    # The same crop_pct (timm's 0.9 for these weights) at the new size.
    assert (loaded.preprocessing.image_size, loaded.preprocessing.resize_size) == (size, int(size / 0.9))


def test_new_head_is_zero_initialised_and_keeps_the_features(tmp_path, photo_arrays):
    ref = reference("Ti16-224")
    loaded = import_checkpoint(save(ref, "hub", tmp_path), num_classes=3)
    assert loaded.config.num_classes == 3 and loaded.labels == ("class_0", "class_1", "class_2")
    assert torch.count_nonzero(loaded.model.head.weight) == 0 and torch.count_nonzero(loaded.model.head.bias) == 0
    x = photo_batch(photo_arrays, 224)
    with torch.no_grad():
        ours = loaded.model.pool(loaded.model.forward_features(x))
        theirs = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert max_abs_diff(ours, theirs) <= PARITY_ATOL


def test_labels_of_the_same_size_keep_the_head(tmp_path, photo_arrays):
    ref = reference("Ti16-224")
    names = list("abcdefg")
    loaded = import_checkpoint(save(ref, "hub", tmp_path), labels=names)
    assert loaded.labels == tuple(names)
    x = photo_batch(photo_arrays, 224)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), ref(x)) <= PARITY_ATOL
    with pytest.raises(CheckpointError, match="num_classes=4 but 7 labels"):
        import_checkpoint(tmp_path, labels=names, num_classes=4)


def test_thousand_classes_without_names_get_imagenet_labels(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", depth=1).eval()
    loaded = import_checkpoint(
        save(model, "safetensors", tmp_path), model_name="vit_tiny_patch16_224", model_args={"depth": 1}
    )
    assert loaded.labels == imagenet1k_labels() and loaded.labels[0] == "tench, Tinca tinca"
    reset = import_checkpoint(
        tmp_path / "weights.safetensors", model_name="vit_tiny_patch16_224", model_args={"depth": 1}, num_classes=1000
    )
    assert reset.labels == imagenet1k_labels()


def test_timm_scheme_downloads_the_hub_repo(tmp_path, monkeypatch, photo_arrays):
    """`timm:<name>` goes through huggingface_hub; the hub is replaced by a local directory here."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    ref = reference("Ti16-224")
    repo = save(ref, "hub", tmp_path / "repo")
    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        if not (repo / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = import_checkpoint("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    assert requested[0] == ("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "config.json")
    assert loaded.source == "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    x = photo_batch(photo_arrays, 224)
    with torch.no_grad():
        assert max_abs_diff(loaded.model(x), ref(x)) <= PARITY_ATOL

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="timm/vit_base_patch16_224"):
        import_checkpoint("timm:vit_base_patch16_224")
