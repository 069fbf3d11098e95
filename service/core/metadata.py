"""The contract between model/ and service/: what an exported ONNX file carries in its metadata_props.

The exporter writes ``ModelMetadata.to_props()``; the service reads ``ModelMetadata.from_props()``
and needs nothing else. Pure Python on purpose: both halves import it, neither pulls the
other's heavy dependencies.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

FORMAT_VERSION = "1"
PREFIX = "vitserve."
# vitserve.golden: [{"name", "image" (base64), "top1"}], written by `vitserve export --golden`.
GOLDEN_KEY = "golden"
# The vitserve.* keys every export carries (format version 1); the rest are optional.
REQUIRED_KEYS = (
    "architecture",
    "labels",
    "image_size",
    "resize_size",
    "resize_mode",
    "interpolation",
    "mean",
    "std",
    "precision",
)
# Every key from_props understands; anything else lands in ``extra``.
KNOWN_KEYS = frozenset(
    {*REQUIRED_KEYS, "format_version", "num_classes", "crop_size", "input_dtype", "source", "weights_sha256", "name"}
)

ResizeMode = Literal["shortest", "squash"]
RESIZE_MODES: tuple[ResizeMode, ...] = ("shortest", "squash")
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
INTERPOLATIONS: tuple[Interpolation, ...] = ("nearest", "bilinear", "bicubic", "lanczos")
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
InputDtype = Literal["float32", "float16"]
INPUT_DTYPES: tuple[InputDtype, ...] = ("float32", "float16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MetadataError(ValueError):
    """The ONNX file's vitserve metadata is missing or malformed; the message names the key."""


_Choice = TypeVar("_Choice", bound=str)


def one_of(value: str, allowed: tuple[_Choice, ...], what: str) -> _Choice:
    """``value`` as one of ``allowed`` (typed as that choice); MetadataError naming ``what`` otherwise."""
    for choice in allowed:
        if value == choice:
            return choice
    raise MetadataError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input; reproduces timm's and Hugging Face's eval transforms.

    Args:
        image_size: the model's input side (square crop), pixels.
        resize_size: "shortest": the shorter side is resized to this, aspect kept (timm:
            floor(image_size / crop_pct)); "squash": both sides are resized to exactly this
            (Hugging Face ViTImageProcessor).
        resize_mode: "shortest" or "squash", see resize_size.
        interpolation: Pillow resampling filter used for the resize.
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
    """

    image_size: int = 224
    resize_size: int = 248
    resize_mode: ResizeMode = "shortest"
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Checked again at run time: callers build this from files and flags, not only typed code.
        one_of(self.resize_mode, RESIZE_MODES, "resize_mode")
        one_of(self.interpolation, INTERPOLATIONS, "interpolation")
        if self.image_size <= 0 or self.resize_size < self.image_size:
            raise MetadataError(
                f"need 0 < image_size <= resize_size, got image_size={self.image_size}, resize_size={self.resize_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise MetadataError(f"mean and std need 3 channels with std > 0, got mean={self.mean}, std={self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def timm_eval(
        cls,
        image_size: int,
        crop_pct: float = 0.9,
        interpolation: Interpolation = "bicubic",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> Preprocessing:
        """timm's eval transform: Resize(floor(size / crop_pct)) on the short side, CenterCrop(size)."""
        import math

        return cls(image_size, math.floor(image_size / crop_pct), "shortest", interpolation, mean, std)

    @classmethod
    def hf_vit(
        cls,
        image_size: int = 224,
        interpolation: Interpolation = "bilinear",
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ) -> Preprocessing:
        """Hugging Face ViTImageProcessor: resize both sides to size, no crop."""
        return cls(image_size, image_size, "squash", interpolation, mean, std)


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the service needs to know about one exported model."""

    architecture: str  # e.g. "vit_base_patch16_224"
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    precision: Precision = "fp32"
    input_dtype: InputDtype = "float32"  # what the service must feed pixel_values as
    source: str = ""  # the checkpoint the export came from
    weights_sha256: str = ""  # hash of the source weights, to tell exports apart
    extra: dict[str, str] = field(default_factory=dict)  # further vitserve.* keys, kept verbatim
    name: str = ""  # the name the API serves it under (a fine-tune's own name); "" = the architecture

    @property
    def served_name(self) -> str:
        """What clients call the model: /v1 "model", the v2 model name, job and score rows."""
        return self.name or self.architecture

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_props(self) -> dict[str, str]:
        p = self.preprocessing
        props = {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "num_classes": str(self.num_classes),
            "labels": json.dumps(list(self.labels)),
            "image_size": str(p.image_size),
            "resize_size": str(p.resize_size),
            "resize_mode": p.resize_mode,
            "interpolation": p.interpolation,
            "crop_size": str(p.image_size),
            "mean": json.dumps(list(p.mean)),
            "std": json.dumps(list(p.std)),
            "precision": self.precision,
            "input_dtype": self.input_dtype,
            "source": self.source,
            "weights_sha256": self.weights_sha256,
        }
        if self.name:
            props["name"] = self.name
        props.update(self.extra)
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Parse metadata_props; raise MetadataError naming every missing or malformed key."""
        ours = {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}
        missing = [PREFIX + k for k in REQUIRED_KEYS if k not in ours]
        if missing:
            raise MetadataError(f"ONNX file lacks vitserve metadata keys: {', '.join(missing)}")
        try:
            labels = tuple(json.loads(ours["labels"]))
            preprocessing = Preprocessing(
                image_size=int(ours["image_size"]),
                resize_size=int(ours["resize_size"]),
                resize_mode=one_of(ours["resize_mode"], RESIZE_MODES, PREFIX + "resize_mode"),
                interpolation=one_of(ours["interpolation"], INTERPOLATIONS, PREFIX + "interpolation"),
                mean=tuple(json.loads(ours["mean"])),
                std=tuple(json.loads(ours["std"])),
            )
            precision = one_of(ours["precision"], PRECISIONS, PREFIX + "precision")
            default_dtype = "float16" if precision == "fp16" else "float32"
            input_dtype = one_of(ours.get("input_dtype", default_dtype), INPUT_DTYPES, PREFIX + "input_dtype")
        except (ValueError, TypeError) as exc:
            raise MetadataError(f"malformed vitserve metadata: {exc}") from exc
        if "num_classes" in ours and int(ours["num_classes"]) != len(labels):
            raise MetadataError(f"{PREFIX}num_classes={ours['num_classes']} but {len(labels)} labels")
        return cls(
            architecture=ours["architecture"],
            labels=labels,
            preprocessing=preprocessing,
            precision=precision,
            input_dtype=input_dtype,
            source=ours.get("source", ""),
            weights_sha256=ours.get("weights_sha256", ""),
            extra={k: v for k, v in ours.items() if k not in KNOWN_KEYS},
            name=ours.get("name", ""),
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly view (for GET /v1/models and `vitserve inspect`)."""
        out = asdict(self)
        out["num_classes"] = self.num_classes
        out.pop("labels")
        return out
