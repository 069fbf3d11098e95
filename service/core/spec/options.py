"""The model description a user may give, one source at a time, and how each value is checked.

``SpecOptions`` holds what one source says (flags / environment, the file's vitserve metadata, a
``<model>.json`` sidecar); ``SpecOptions.parse`` validates raw values from any of them in one place.
``SPEC_FIELDS`` names and explains every field, so the command line, the settings and the error
messages all speak of the same options.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from service.core.metadata import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from service.core.spec.labels import check_labels, load_labels

# Where an effective value came from, highest precedence first (service/core/spec/__init__.py).
FLAG, METADATA, SIDECAR, GRAPH, DEFAULT = "flag", "metadata", "sidecar", "graph", "default"
LAYOUTS = ("nchw", "nhwc")
RESIZE_MODES = ("shortest", "squash")
# Named normalisations users know by name (timm's constants).
NAMED_NORMALISATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# The fields that describe a foreign file, with their help text. Values stay strings until
# SpecOptions.parse. ``name`` is not among them: it is a setting of its own (--name).
SPEC_FIELDS: dict[str, str] = {
    "image_size": "side of the square model input, pixels (foreign files)",
    "resize": "resize target in pixels before the centre crop (see --resize-mode)",
    "resize_mode": "shortest (resize the short side, centre-crop) or squash (both sides)",
    "crop": "centre-crop fraction, timm's crop_pct (resize = floor(image_size / crop)); instead of --resize",
    "interpolation": "nearest, bilinear, bicubic or lanczos",
    "mean": "per-channel mean, e.g. 0.5,0.5,0.5 or imagenet",
    "std": "per-channel std, e.g. 0.5,0.5,0.5 or imagenet",
    "labels": "class names: labels.txt (one per line) or labels.json "
    "(list, index->name, or a config.json with id2label)",
    "input_name": "the graph input that gets the pixels, when there are several",
    "output_name": "the graph output holding the logits, when there are several",
    "input_layout": "nchw or nhwc (channels-last), when the graph does not tell",
}


def flag_name(field_name: str) -> str:
    """The command-line spelling of a field: ``image_size`` -> ``--image-size``."""
    return "--" + field_name.replace("_", "-")


class ModelSpecError(ValueError):
    """The model cannot be served as described; the message names the field or tensor and the fix."""


@dataclass(frozen=True)
class SpecOptions:
    """Values given by one source (flags, the file's metadata, a sidecar); None = not given there.

    Args:
        name: model name shown by the API (our metadata's ``name``; its ``architecture`` is the fallback).
        image_size: side of the square model input, pixels.
        resize: resize target, pixels (see ``resize_mode``).
        resize_mode: "shortest" (resize the shorter side, then centre-crop) or "squash" (both sides).
        crop: timm's crop_pct in (0, 1]; an alternative to ``resize``.
        interpolation: nearest, bilinear, bicubic or lanczos.
        mean, std: per-channel normalisation after scaling pixels to [0, 1].
        labels: class names, index order.
        labels_origin: where the labels were read from (a file path, or "inline").
        input_name, output_name: which graph input gets the pixels and which output holds the logits.
        input_layout: "nchw" or "nhwc" (channels-last: the engine transposes).
    """

    name: str | None = None
    image_size: int | None = None
    resize: int | None = None
    resize_mode: str | None = None
    crop: float | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    labels: tuple[str, ...] | None = None
    labels_origin: str | None = None
    input_name: str | None = None
    output_name: str | None = None
    input_layout: str | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, where: str, base_dir: Path | None = None) -> SpecOptions:
        """Validate raw values (strings from flags/env, JSON values from a sidecar) naming ``where`` on error.

        ``labels`` may be a path (relative paths resolve against ``base_dir``) or a list of names.
        Unknown keys are refused so a typo in a sidecar does not silently do nothing.
        """
        known = {f.name for f in fields(cls)} - {"labels_origin"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ModelSpecError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            try:
                if key == "labels":
                    values["labels"], values["labels_origin"] = _parse_labels(value, base_dir)
                else:
                    values[key] = _PARSERS[key](value)
            except (ValueError, TypeError, OSError) as exc:
                raise ModelSpecError(f"{where}: {key}: {exc}") from exc
        if values.get("resize") is not None and values.get("crop") is not None:
            raise ModelSpecError(
                f"{where}: give either resize or crop, not both (crop sets resize = floor(image_size / crop))"
            )
        return cls(**values)

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected a positive integer, got {value!r}")
    number = int(value)
    if number <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _crop_fraction(value: Any) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError(f"crop is a fraction in (0, 1] (timm's crop_pct, e.g. 0.875), got {value!r}")
    return number


def _choice(options: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    return parse


def _channels(kind: str) -> Callable[[Any], tuple[float, float, float]]:
    def parse(value: Any) -> tuple[float, float, float]:
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in NAMED_NORMALISATIONS:
                return NAMED_NORMALISATIONS[text.lower()][0 if kind == "mean" else 1]
            items = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        else:
            items = list(value)
        numbers = tuple(float(v) for v in items)
        if len(numbers) != 3 or any(not math.isfinite(v) for v in numbers):
            names = ", ".join(NAMED_NORMALISATIONS)
            raise ValueError(f"expected 3 numbers (R,G,B) such as 0.5,0.5,0.5 or a name ({names}), got {value!r}")
        if kind == "std" and min(numbers) <= 0:
            raise ValueError(f"std must be > 0 for every channel, got {numbers}")
        return numbers

    return parse


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value.strip()


_PARSERS = {
    "name": _name,
    "image_size": _positive_int,
    "resize": _positive_int,
    "resize_mode": _choice(RESIZE_MODES),
    "crop": _crop_fraction,
    "interpolation": _choice(INTERPOLATIONS),
    "mean": _channels("mean"),
    "std": _channels("std"),
    "input_name": _name,
    "output_name": _name,
    "input_layout": _choice(LAYOUTS),
}


def _parse_labels(value: Any, base_dir: Path | None) -> tuple[tuple[str, ...], str]:
    if isinstance(value, (list, tuple)):
        return check_labels(value, "the list"), "inline"
    path = Path(os.path.expanduser(str(value)))
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return load_labels(path), str(path)


def options_from_values(values: Mapping[str, Any], *, where: str) -> SpecOptions:
    """The SPEC_FIELDS and ``name`` given in ``values`` (None = not given), e.g. parsed flags or settings."""
    return SpecOptions.parse({key: values.get(key) for key in ("name", *SPEC_FIELDS)}, where=where)
