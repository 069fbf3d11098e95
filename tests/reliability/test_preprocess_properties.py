"""Property tests (hypothesis) on pre-processing: any bytes, and any valid image of any mode, size,
aspect ratio and format, give a correctly shaped normalised array or a clean InvalidImage;
never another exception. In-process (no server): pre-processing is pure functions.

RELIABILITY_PROPERTY_EXAMPLES scales the example counts (CI: 150 per property; `make fuzz`: 3000).
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_lib import scale

from service.core.errors import InvalidImage
from service.core.metadata import Preprocessing
from service.runtime.preprocess import load_pixels

EXAMPLES = scale("RELIABILITY_PROPERTY_EXAMPLES", 150)
# Pillow warns on odd but readable TIFF tags; that is not an error of ours.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
POLICIES = [
    Preprocessing.timm_eval(32, 0.875, "bicubic"),
    Preprocessing(
        image_size=24,
        resize_size=24,
        resize_mode="squash",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
]
MAX_PIXELS = 2_000_000

# Real file signatures, so random tails reach each decoder's header and data parsing.
MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x10\x00\x00\x00WEBPVP8L",
]
# Pillow modes an uploaded file can decode to, and the formats that can carry each.
MODE_FORMATS = {
    "1": ["PNG", "BMP", "TIFF", "GIF"],
    "L": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"],
    "P": ["PNG", "BMP", "TIFF", "GIF"],
    "RGB": ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"],
    "RGBA": ["PNG", "TIFF", "WEBP"],
    "LA": ["PNG", "TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["PNG", "TIFF"],
    "F": ["TIFF"],
    "YCbCr": ["JPEG"],
    "PA": ["PNG"],
}


def _assert_model_input(pixels: np.ndarray, p: Preprocessing) -> None:
    assert pixels.shape == (3, p.image_size, p.image_size)
    assert pixels.dtype == np.float32 and np.isfinite(pixels).all()
    mean, std = np.asarray(p.mean)[:, None, None], np.asarray(p.std)[:, None, None]
    assert (pixels >= (0 - mean) / std - 1e-5).all() and (pixels <= (1 - mean) / std + 1e-5).all()


def _load_or_invalid(data: bytes, p: Preprocessing) -> None:
    try:
        pixels = load_pixels(data, p, max_pixels=MAX_PIXELS, jpeg_draft=True)
    except InvalidImage as exc:
        assert exc.status_code == 422 and exc.message  # clean, explained rejection
        return
    _assert_model_input(pixels, p)


@pytest.mark.parametrize("p", POLICIES, ids=["timm-shortest", "hf-squash"])
@PROPERTY
@given(magic=st.sampled_from(MAGIC), tail=st.binary(max_size=4096))
def test_arbitrary_bytes_give_pixels_or_invalid_image(p, magic, tail):
    _load_or_invalid(magic + tail, p)


@st.composite
def images(draw):
    mode = draw(st.sampled_from(sorted(MODE_FORMATS)))
    fmt = draw(st.sampled_from(MODE_FORMATS[mode]))
    # Any aspect ratio: sides 1..600, and sometimes a 1-pixel-thin strip up to 5000 long.
    if draw(st.booleans()):
        width, height = draw(st.integers(1, 600)), draw(st.integers(1, 600))
    else:
        long, short = draw(st.integers(600, 5000)), draw(st.integers(1, 3))
        width, height = (long, short) if draw(st.booleans()) else (short, long)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode in ("I;16", "I"):
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        image = image if mode == "I;16" else image.convert("I")
    elif mode == "F":
        image = Image.fromarray(rng.random((height, width), dtype=np.float32) * draw(st.sampled_from([1.0, 255.0])))
    elif mode == "PA":
        image = base.convert("P").convert("PA")
    else:
        image = base.convert(mode)
    return image, fmt


@pytest.mark.parametrize("p", POLICIES, ids=["timm-shortest", "hf-squash"])
@PROPERTY
@given(case=images(), cut=st.one_of(st.none(), st.floats(0.0, 0.99)))
def test_any_valid_image_gives_pixels_and_any_truncation_is_clean(p, case, cut):
    image, fmt = case
    buf = io.BytesIO()
    try:
        image.save(buf, fmt)
    except (OSError, ValueError, KeyError):
        assume(False)  # this Pillow cannot write that mode in that format: not an input anyone can send
    data = buf.getvalue()
    if cut is None:
        _assert_model_input(load_pixels(data, p, max_pixels=MAX_PIXELS, jpeg_draft=True), p)  # must succeed
    else:
        _load_or_invalid(data[: int(len(data) * cut)], p)  # truncated anywhere: pixels or InvalidImage


@PROPERTY
@given(width=st.integers(1, 70_000), height=st.integers(1, 70_000))
def test_pixel_limit_is_checked_from_the_header(width, height):
    """A PNG header claiming width x height with a few bytes of data: over the limit it is refused
    from the header alone (no allocation), under it the missing data is a clean InvalidImage."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")
    with pytest.raises(InvalidImage) as info:
        load_pixels(data, POLICIES[0], max_pixels=MAX_PIXELS)
    if width * height > MAX_PIXELS:
        assert "limit" in info.value.message  # ours, or Pillow's bomb guard past 2x its own limit
