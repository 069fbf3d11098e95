"""Image bytes -> the model's normalised input, as pure functions (Pillow + numpy).

Reproduces the references the models were trained with:
- timm's eval transform (``resize_mode="shortest"``): torchvision ``Resize(resize_size)`` on the
  shorter side (long side ``int(resize_size * long / short)``), ``CenterCrop(image_size)`` with
  torchvision's rounding, ``ToTensor`` (uint8 / 255 in float32) and ``Normalize``;
- Hugging Face ``ViTImageProcessor`` (``resize_mode="squash"``): both sides to ``resize_size``.

The full resize followed by the crop is bit-exact with timm (max abs diff 0.0 on the skimage
photos). Only for extreme aspect ratios (resized area over ``_MAX_RESIZED_AREA_FACTOR`` times the
square) is the resize computed for the surviving centre crop alone (Pillow's ``box`` argument),
so a 1 x 10000 image costs 224 x 224 pixels of work, not 248 x 2,480,000; that path differs from
the full resize by at most one uint8 level in a few pixels (float rounding of the box). Normalisation is a per-channel
256-entry lookup table built with the same float32 operations as torchvision, so the result
matches the reference pipeline bit for bit when Pillow produces the same resized pixels.

Transparency is composited on white (a transparent PNG of a drawing shows as drawn on paper),
16-bit images are scaled to 8 bits by rounding v / 257, CMYK is converted by Pillow (inverted
Adobe CMYK JPEGs included), animations use their first frame, EXIF orientation is applied.
JPEG draft mode (libjpeg's DCT-domain downscaling by 1/2, 1/4, 1/8) is used only for large
JPEGs, and only so far that the drafted image keeps at least twice the resize target on its
short side (``_DRAFT_MARGIN``): the final antialiased resize then still does most of the
reduction. For 224-pixel models that means JPEGs with a short side >= 992 px; smaller ones
(and every other format) decode exactly as the references do. Measured on skimage photos
upscaled to 1-6 Mpx: mean |diff| 0.002-0.008 and max |diff| <= 0.7 in normalised units (a few
pixels on sharp edges) against the full decode, for 3-13x faster decoding. ``jpeg_draft=False``
turns it off for strict parity.

Only the allowed formats are opened, and nothing is decoded before every block the decoder will
allocate has been checked against the pixel limit (service/runtime/decode_guards.py). Decoding
is split so that callers can count and gate it: ``open_image`` (headers only) returns the image
and the pixels its decode will touch, ``decode_opened`` decodes it; ``load_pixels`` and
``decode_image`` take an ``admit`` hook entered between the two (service/runtime/decode_limits.py).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core.errors import InvalidImage
from service.core.image_formats import DEFAULT_FORMATS, describe
from service.core.metadata import Preprocessing
from service.runtime.decode_guards import (
    check_before_open,
    opened_format_allowed,
    pixels_to_decode,
    refused_format_name,
)

# Our own limits (decode_guards) are the ones that count; Pillow's global one only warns. Set once
# here: warnings.catch_warnings() per decode would race between the pre-processing threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Entered with the pixel count of a checked, not yet decoded image; held while it is decoded.
Admit = Callable[[int], AbstractContextManager[object]]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Above this many squares of resize_size, resize only the crop (memory and time stay bounded).
_MAX_RESIZED_AREA_FACTOR = 16
# JPEG draft never shrinks the short side below this many times the resize target.
_DRAFT_MARGIN = 2


def open_image(
    data: bytes, *, max_pixels: int, formats: tuple[str, ...] = DEFAULT_FORMATS, min_short_side: int | None = None
) -> tuple[Image.Image, int]:
    """Open ``data`` (headers only: no pixel decoded yet) and check it; returns it and what it will cost.

    Args:
        data: the encoded image.
        max_pixels: the limit every block the decoder allocates is checked against (decode_guards).
        formats: the formats that may be opened (Pillow's names); any other is InvalidImage.
        min_short_side: if given, a JPEG may be decoded in draft mode (downscaled by a power of
            two in the DCT domain) as long as its short side stays >= this.

    Returns (image, pixels): ``pixels`` is what decoding it will allocate (draft applied).
    Raises InvalidImage (naming the problem) for empty input, non-images, formats not allowed,
    and images with a block over ``max_pixels``.
    """
    if not data:
        raise InvalidImage("empty body: expected image bytes")
    with _as_invalid_image(formats, data):
        check_before_open(data, formats, max_pixels)
        image = Image.open(io.BytesIO(data), formats=formats)
        if not opened_format_allowed(image.format, formats):
            raise InvalidImage(f"image format {image.format} is not accepted ({_accepted(formats)})")
        pixels_to_decode(image, max_pixels)
        image.seek(0)  # animations (GIF, APNG, WebP): the first frame
        width, height = image.size
        if min_short_side and image.format == "JPEG" and min(width, height) >= 2 * min_short_side:
            k = min_short_side / min(width, height)
            image.draft("RGB", (math.ceil(width * k), math.ceil(height * k)))
        return image, pixels_to_decode(image, max_pixels)


def decode_opened(image: Image.Image, formats: tuple[str, ...] = DEFAULT_FORMATS) -> Image.Image:
    """Decode an image from ``open_image`` into 8-bit RGB, upright, alpha composited on white."""
    with _as_invalid_image(formats):
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no second copy of a large image
        return to_rgb(image)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    min_short_side: int | None = None,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    admit: Admit | None = None,
) -> Image.Image:
    """Decode bytes into an 8-bit RGB image, upright, first frame, alpha composited on white.

    Arguments as ``open_image``; ``admit(pixels)`` (if given) is entered after every check and
    before any pixel is decoded, and left when the decode is done (service.runtime.decode_limits).
    """
    image, pixels = open_image(data, max_pixels=max_pixels, formats=formats, min_short_side=min_short_side)
    with admit(pixels) if admit is not None else nullcontext():
        return decode_opened(image, formats)


def _accepted(formats: tuple[str, ...]) -> str:
    return "this server decodes " + describe(formats)


@contextmanager
def _as_invalid_image(formats: tuple[str, ...], data: bytes = b"") -> Iterator[None]:
    """Pillow's many ways of saying "bad file" -> InvalidImage naming the problem."""
    try:
        yield
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        refused = refused_format_name(data)
        if refused is not None and refused not in formats:
            raise InvalidImage(f"image format {refused} is not accepted ({_accepted(formats)})") from None
        raise InvalidImage(f"not an image: the bytes are in no format {_accepted(formats)}") from None
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"image over the pixel limit: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated ...").
        raise InvalidImage(f"cannot decode image: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the policies)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.uint32)
        # 16-bit PNG/TIFF open as I;16 or I with values 0..65535; v / 257 maps 65535 -> 255 exactly.
        image = Image.fromarray(((values + 128) // 257).clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if float(values.max(initial=0.0)) <= 1.0 else 1.0  # float TIFFs: 0..1 or 0..255
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    elif image.mode in ("RGB", "L") and "transparency" in image.info:
        image = image.convert("RGBA")  # a tRNS colour key
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def resize_and_crop(image: Image.Image, p: Preprocessing) -> Image.Image:
    """Resize as the reference does, returning only the central ``image_size`` square."""
    width, height = image.size
    if p.resize_mode == "shortest":
        # torchvision's _compute_resized_output_size: the long side is truncated, not rounded.
        if width <= height:
            new_w, new_h = p.resize_size, int(p.resize_size * height / width)
        else:
            new_w, new_h = int(p.resize_size * width / height), p.resize_size
    else:
        new_w = new_h = p.resize_size
    crop = p.image_size
    # torchvision CenterCrop: offsets int(round((size - crop) / 2)) (Python's round: half to even).
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    resample = _RESAMPLE[p.interpolation]
    if new_w * new_h <= _MAX_RESIZED_AREA_FACTOR * p.resize_size**2:
        # Pillow resizes in two passes, horizontal then vertical, rounding to uint8 in between; the
        # vertical pass treats every column alone. So the columns the crop drops are dropped between
        # the passes: the same pixels bit for bit (what a single resize computes), and 10-20% less
        # work on landscape photos, whose vertical pass would resize all ~1.5 x crop columns. (Not
        # with alpha: Pillow premultiplies around each call, so two calls would round twice.)
        if new_w > crop and image.mode in ("RGB", "L"):
            rows = image.resize((new_w, height), resample) if new_w != width else image
            image, width = rows.crop((left, 0, left + crop, height)), crop
            new_w, left = crop, 0
        resized = image.resize((new_w, new_h), resample) if (new_w, new_h) != (width, height) else image
        return resized.crop((left, top, left + crop, top + crop))
    scale_x, scale_y = width / new_w, height / new_h
    box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
    return image.resize((crop, crop), resample, box=box)


@lru_cache(maxsize=16)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: the value torchvision's ToTensor + Normalize gives each uint8 level."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255)  # ToTensor: float32 division
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    table = (levels[None, :] - m) / s  # Normalize: sub_ then div_, both float32
    table.setflags(write=False)
    return table


def normalise(image: Image.Image, p: Preprocessing) -> np.ndarray:
    """RGB uint8 image (H, W) -> (3, H, W) float32 normalised with the model's mean and std."""
    pixels = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    table = _normalise_table(p.mean, p.std)
    out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[:, :, channel], out=out[channel])
    return out


def preprocess(image: Image.Image, p: Preprocessing) -> np.ndarray:
    """A decoded RGB image -> (3, image_size, image_size) float32, exactly the reference transform."""
    if image.mode != "RGB":
        image = to_rgb(image)
    return normalise(resize_and_crop(image, p), p)


def load_pixels(
    data: bytes,
    p: Preprocessing,
    *,
    max_pixels: int,
    jpeg_draft: bool = False,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    admit: Admit | None = None,
) -> np.ndarray:
    """Image bytes -> (3, image_size, image_size) float32 model input; InvalidImage on bad input.

    ``jpeg_draft`` allows draft decoding of large JPEGs (see the module docstring); off = exact.
    ``formats`` and ``admit`` as in ``decode_image``; the admission is held until the array is built.
    """
    min_short_side = _DRAFT_MARGIN * p.resize_size if jpeg_draft else None
    image, pixels = open_image(data, max_pixels=max_pixels, formats=formats, min_short_side=min_short_side)
    with admit(pixels) if admit is not None else nullcontext():
        return preprocess(decode_opened(image, formats), p)
