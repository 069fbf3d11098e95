"""Import a ViT checkpoint from wherever it comes from: one function, one result, one error type.

``import_checkpoint(source)`` accepts (see README "Importing checkpoints"):

    timm:<name>                 timm's pretrained weights from the Hugging Face hub (repo ``timm/<name>``)
    hf:<repo id>                a Hugging Face ViTForImageClassification repo (config.json + weights)
    random:<variant>            random weights of a named variant (benchmarks, tests)
    <dir with vitserve.json>    our native format (model/native.py)
    <dir with config.json>      a timm hub-style directory ("architecture") or a Hugging Face one (model_type "vit")
    <file>.safetensors/.pth/.bin/.pt   a timm state dict; needs model_name
    <file>.npz                  the paper's own release layout; needs model_name

Each source is turned into our parameter names by a pure dict -> dict conversion
(model/convert/), position embeddings are resampled when another image size is asked for,
and the result is loaded with ``load_state_dict(strict=True)`` only after every key and shape
was checked, so a bad checkpoint raises CheckpointError instead of giving a half-loaded model.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from model import native
from model.config import ViTConfig
from model.convert import hf as hf_format
from model.convert import npz as npz_format
from model.convert import timm as timm_format
from model.convert.raw import (
    STATE_DICT_SUFFIXES,
    CheckpointError,
    RawCheckpoint,
    StateDict,
    check_state_dict,
    read_json,
    read_state_dict_file,
)
from model.labels import check_labels, default_labels
from model.pos_embed import resample_pos_embed
from model.vit import VisionTransformer
from service.core.metadata import Preprocessing

__all__ = ["CheckpointError", "LoadedCheckpoint", "RawCheckpoint", "import_checkpoint", "load_native"]


@dataclass
class LoadedCheckpoint:
    """An imported checkpoint, ready to run or export.

    Args:
        model: the ViT in eval mode, fp32, on CPU.
        config: its configuration (``model.config``).
        labels: one name per class, ``len(labels) == config.num_classes``.
        preprocessing: the eval transform the weights expect.
        source: the source string as given to ``import_checkpoint``.
        weights_sha256: ``state_dict_sha256(model.state_dict())``; same weights, same hash.
        origin: where the weights first came from (the ``source`` recorded in a native
            checkpoint's vitserve.json; equal to ``source`` for every other format).
        extra: free-form provenance recorded by ``save_native`` (empty for other formats).
    """

    model: VisionTransformer
    config: ViTConfig
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    source: str
    weights_sha256: str
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the weights: sorted keys, each key's name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Through uint8 so every dtype (bf16 included) hashes its exact bytes.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_loaded_model(state_dict: Mapping[str, torch.Tensor], config: ViTConfig, *, where: str) -> VisionTransformer:
    """Check every key and shape, then load strictly into a fresh fp32 model in eval mode."""
    check_state_dict(state_dict, config, where=where)
    # Build on meta and materialise empty storage: no time is spent on an init that is overwritten.
    with torch.device("meta"):
        model = VisionTransformer(config)
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=True)
    return model.eval()


def resize_preprocessing(preprocessing: Preprocessing, image_size: int) -> Preprocessing:
    """The same transform for another input size: squash stays squash, shortest-side keeps its crop ratio."""
    if preprocessing.image_size == image_size:
        return preprocessing
    if preprocessing.resize_mode == "squash" and preprocessing.resize_size == preprocessing.image_size:
        resize_size = image_size
    else:
        resize_size = math.floor(image_size / _crop_pct(preprocessing.image_size, preprocessing.resize_size))
    return replace(preprocessing, image_size=image_size, resize_size=max(resize_size, image_size))


def _crop_pct(image_size: int, resize_size: int) -> float:
    """The crop_pct a timm-style transform was made from: the shortest decimal that gives back resize_size.

    Stored transforms only keep pixels (224 / 0.95 -> 235); 224 / 235 = 0.9532 would drift at another size.
    """
    ratio = image_size / resize_size
    for digits in range(2, 6):
        candidate = round(ratio, digits)
        if candidate > 0 and math.floor(image_size / candidate) == resize_size:
            return candidate
    return ratio


# ---------------------------------------------------------------------------------------------
# The one entry point
# ---------------------------------------------------------------------------------------------


def import_checkpoint(
    source: str | os.PathLike,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    labels: Sequence[str] | None = None,
    image_size: int | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Load ``source`` as a ready-to-run ViT (see the module docstring for the source syntaxes).

    Args:
        source: where the weights are.
        model_name: the architecture of a bare state dict or .npz (``vit_base_patch16_224``, ``B/16``).
        num_classes: K; a head of another size is replaced by a fresh zero-initialised D x K layer.
        labels: K class names (implies ``num_classes=len(labels)``).
        image_size: input size; position embeddings are resampled in 2-D when it differs.
        model_args: timm ``create_model`` keyword arguments the weights were built with
            (``depth``, ``global_pool``, ``class_token``, ``fc_norm``...), as timm records them in
            a hub config's ``model_args``.
    """
    raw = _read_source(str(source), model_name=model_name, model_args=model_args)
    return assemble(raw, str(source), num_classes=num_classes, labels=labels, image_size=image_size)


def assemble(
    raw: RawCheckpoint,
    source: str,
    *,
    num_classes: int | None = None,
    labels: Sequence[str] | None = None,
    image_size: int | None = None,
) -> LoadedCheckpoint:
    """Turn a format reader's RawCheckpoint into a LoadedCheckpoint (resample, check, load, replace the head)."""
    if labels is not None:
        if num_classes is not None and num_classes != len(labels):
            raise CheckpointError(f"num_classes={num_classes} but {len(labels)} labels were given")
        num_classes = len(labels)
    where = source
    state_dict, config = raw.state_dict, raw.config

    if image_size is not None and image_size != config.image_size:
        state_dict, config = _resample_to(state_dict, config, image_size, where=where)
    model = build_loaded_model(state_dict, config, where=where)

    ckpt_labels = raw.labels
    if ckpt_labels is not None and len(ckpt_labels) != config.num_classes:
        raise CheckpointError(f"{where} names {len(ckpt_labels)} labels for a head with {config.num_classes} classes")
    if num_classes is not None and num_classes != config.num_classes:
        model.reset_head(num_classes)
        ckpt_labels = None  # the names belonged to the dropped head
    final_labels = (
        check_labels(labels, model.config.num_classes)
        if labels is not None
        else (ckpt_labels or default_labels(model.config.num_classes))
    )
    if raw.preprocessing_at is not None:
        preprocessing = raw.preprocessing_at(model.config.image_size)
    elif raw.preprocessing is not None:
        preprocessing = resize_preprocessing(raw.preprocessing, model.config.image_size)
    else:
        preprocessing = Preprocessing.timm_eval(model.config.image_size)
    return LoadedCheckpoint(
        model=model,
        config=model.config,
        labels=final_labels,
        preprocessing=preprocessing,
        source=source,
        weights_sha256=state_dict_sha256(model.state_dict()),
        origin=raw.origin or source,
        extra=raw.extra,
    )


def _resample_to(
    state_dict: StateDict, config: ViTConfig, image_size: int, *, where: str
) -> tuple[StateDict, ViTConfig]:
    try:
        new_config = config.replace(image_size=image_size)
    except ValueError as exc:
        raise CheckpointError(f"cannot run {where} at {image_size}px: {exc}") from exc
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is None:
        return state_dict, new_config  # check_state_dict reports the missing key
    expected_tokens = config.num_patches + config.num_prefix_tokens
    if pos_embed.ndim != 3 or pos_embed.shape[1] != expected_tokens:
        raise CheckpointError(
            f"{where}: pos_embed (expected {(1, expected_tokens, config.embed_dim)}, got {tuple(pos_embed.shape)})"
        )
    resampled = resample_pos_embed(
        pos_embed, (new_config.grid_size, new_config.grid_size), num_prefix_tokens=config.num_prefix_tokens
    )
    return {**state_dict, "pos_embed": resampled}, new_config


def load_native(directory: str | os.PathLike) -> LoadedCheckpoint:
    """Load a directory written by ``save_native``; its ``source`` is the directory, ``origin`` the recorded source."""
    return assemble(native.read_native(directory), str(directory))


def _read_source(source: str, *, model_name: str | None, model_args: Mapping[str, Any] | None) -> RawCheckpoint:
    scheme, _, rest = source.partition(":")
    # An existing path wins; a one-letter "scheme" is a Windows drive; a separator before ":" means a path.
    is_scheme = rest and len(scheme) > 1 and "/" not in scheme and os.sep not in scheme
    if is_scheme and not Path(source).exists():
        if scheme == "random":
            return _random_checkpoint(rest, model_args)
        if scheme == "timm":
            directory = _download(f"timm/{rest}", timm_format.HUB_FILES)
            return timm_format.read_hub_dir(directory, source, model_args=model_args)
        if scheme == "hf":
            return hf_format.read_dir(_download(rest, hf_format.HUB_FILES), source)
        raise CheckpointError(f"unknown checkpoint scheme {scheme!r} in {source!r}; use timm:, hf:, random: or a path")

    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {source}")
    if path.is_dir():
        return _read_directory(path, source, model_args=model_args)
    if path.suffix == ".npz":
        return npz_format.read_file(path, _config_for_bare_file(path, model_name, model_args))
    if path.suffix in STATE_DICT_SUFFIXES:
        config = _config_for_bare_file(path, model_name, model_args)
        return timm_format.read_state_dict(read_state_dict_file(path), config, where=source)
    raise CheckpointError(
        f"cannot tell the format of {source}: expected a directory, .npz or {'/'.join(STATE_DICT_SUFFIXES)}"
    )


def _read_directory(path: Path, source: str, *, model_args: Mapping[str, Any] | None) -> RawCheckpoint:
    """A directory's format is told by one file (vitserve.json) or one key of its config.json."""
    if (path / native.CONFIG_NAME).is_file():
        return native.read_native(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{path} holds neither {native.CONFIG_NAME} (vitserve) nor config.json (timm, Hugging Face)"
        )
    config_json = read_json(config_path)
    if "architecture" in config_json:
        return timm_format.read_hub_dir(path, source, model_args=model_args)
    if "model_type" in config_json:
        return hf_format.read_dir(path, source)
    raise CheckpointError(f"{config_path} has neither 'architecture' (timm) nor 'model_type' (Hugging Face)")


def _config_for_bare_file(path: Path, model_name: str | None, model_args: Mapping[str, Any] | None) -> ViTConfig:
    if model_name is None:
        raise CheckpointError(
            f"{path} is a bare state dict: pass model_name= (e.g. 'vit_base_patch16_224' or 'B/16') "
            "to say its architecture"
        )
    return timm_format.config_from_timm(model_name, model_args or {})


def _random_checkpoint(variant: str, model_args: Mapping[str, Any] | None) -> RawCheckpoint:
    """Random weights, seeded so the same variant always gives the same weights (and hash)."""
    config = timm_format.config_from_timm(variant, model_args or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(config)
        # The paper's zero head would make every logit 0; a random one gives outputs worth benchmarking.
        if config.num_classes > 0:
            torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
    return RawCheckpoint(state_dict=model.state_dict(), config=config, origin=f"random:{variant}")


def _download(repo_id: str, files: Mapping[str, tuple[str, ...]]) -> Path:
    """Fetch a hub repo's files into the local cache; return the snapshot directory.

    ``files`` maps "required" / "optional" / "weights" to file names: every required one, every
    optional one that exists, and the first of the weights that exists.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"downloading {repo_id} needs huggingface_hub: pip install 'vitserve[model]'") from exc

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name))
        except LocalEntryNotFoundError as exc:  # offline and not cached: says nothing about the repo's files
            raise CheckpointError(f"cannot download {name} from the hub repo {repo_id} (offline?): {exc}") from exc
        except EntryNotFoundError:
            return None  # the repo has no such file
        except Exception as exc:  # offline, unknown repo, gated repo: all end the import the same way
            raise CheckpointError(f"cannot download {name} from the hub repo {repo_id}: {exc}") from exc

    snapshot = None
    for name in files.get("required", ()):
        got = fetch(name)
        if got is None:
            raise CheckpointError(f"hub repo {repo_id} has no {name}")
        snapshot = got.parent
    for name in files.get("optional", ()):
        fetch(name)
    for name in files.get("weights", ()):
        if fetch(name) is not None:
            break
    else:
        raise CheckpointError(f"hub repo {repo_id} has none of {', '.join(files.get('weights', ()))}")
    assert snapshot is not None
    return snapshot
