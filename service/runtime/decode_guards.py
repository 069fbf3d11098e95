"""Which image formats are decoded, and what a file will cost to decode, known before any pixel is.

The pixel limit is only a defence if it sees everything a decoder allocates. A file's header size
is not always that: a TIFF declares its tile and strip sizes separately (a 16 x 16 TIFF with one
46336 x 46336 tile makes libtiff allocate and touch a 2 GiB tile buffer), an ICO embeds PNGs
whose real size its directory does not give (Pillow decodes them inside ``Image.open``), and a
WebP declares a canvas the animation decoder allocates when the file is opened. So:

- only an allow-list of formats is opened (``Image.open(formats=...)``), each one a format
  whose decode cost this module can read from its headers: formats outside the list (EPS,
  which runs Ghostscript, JPEG 2000, PSD, ...) never reach their decoder;
- ``check_before_open`` reads, from the raw bytes, the sizes that Pillow would act on while
  opening (every ICO member, the WebP canvas);
- ``pixels_to_decode`` reads, from the opened but not yet decoded image, every block a decoder
  will allocate (the image, and for TIFF one tile or strip on top), checks each against the
  limit, and returns the total: the figure the request budget and the process-wide gate count.
"""

from __future__ import annotations

import struct

from PIL import Image

from service.core.errors import InvalidImage

# Pillow names what some openers return differently: a JPEG with a multi-picture index is an MPO.
_ALSO_RETURNED = {"JPEG": ("MPO",)}

_TIFF_IMAGE_WIDTH, _TIFF_IMAGE_LENGTH, _TIFF_ROWS_PER_STRIP = 256, 257, 278
_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 322, 323
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def opened_format_allowed(image_format: str | None, formats: tuple[str, ...]) -> bool:
    return image_format in formats or any(image_format in _ALSO_RETURNED.get(f, ()) for f in formats)


def refused_format_name(data: bytes) -> str | None:
    """The name of the format ``data`` is in, from the signature checks alone (no decoder runs)."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        _, accept = Image.OPEN[name]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a plugin's signature check on arbitrary bytes; only a hint
            continue
    return None


def _over(what: str, width: int, height: int, max_pixels: int) -> InvalidImage:
    return InvalidImage(f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels")


def check_before_open(data: bytes, formats: tuple[str, ...], max_pixels: int) -> None:
    """Sizes Pillow acts on while *opening* (before our checks could run), read from the raw bytes."""
    if "ICO" in formats and data[:4] == b"\x00\x00\x01\x00":
        _check_ico_members(data, max_pixels)
    if "WEBP" in formats and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = _webp_canvas(data)
        if size is not None and size[0] * size[1] > max_pixels:
            raise _over("WebP canvas", *size, max_pixels)


def _check_ico_members(data: bytes, max_pixels: int) -> None:
    # Pillow decodes the largest member inside Image.open, and its directory entry says at most 256 x 256.
    count = int.from_bytes(data[4:6], "little")
    for i in range(count):
        entry = data[6 + 16 * i : 22 + 16 * i]
        if len(entry) < 16:
            raise InvalidImage(f"ICO directory is truncated at entry {i}")
        offset = int.from_bytes(entry[12:16], "little")
        member = data[offset : offset + 26]
        if member[:8] == _PNG_MAGIC and len(member) >= 24:
            width, height = struct.unpack(">II", member[16:24])
        elif len(member) >= 12 and int.from_bytes(member[:4], "little") == 12:  # BITMAPCOREHEADER
            width, height = struct.unpack("<HH", member[4:8])
            height //= 2  # XOR image and AND mask stacked
        elif len(member) >= 12:  # BITMAPINFOHEADER and later
            width, height = struct.unpack("<ii", member[4:12])
            width, height = abs(width), abs(height) // 2
        else:
            raise InvalidImage(f"ICO member {i} points past the end of the file")
        if width * height > max_pixels:
            raise _over(
                f"ICO member {i} (its directory says {entry[0] or 256}x{entry[1] or 256})", width, height, max_pixels
            )


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30:
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def pixels_to_decode(image: Image.Image, max_pixels: int) -> int:
    """Every block the decoder will allocate for ``image`` (opened, not loaded), each checked; their sum.

    Raises InvalidImage naming the block that is over ``max_pixels``.
    """
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _over("image", width, height, max_pixels)
    total = width * height
    if image.format == "TIFF":
        total += _tiff_block(image, max_pixels)
    return total


def _tiff_block(image: Image.Image, max_pixels: int) -> int:
    """libtiff reads a TIFF one tile or strip at a time into a buffer of that block's declared size."""
    tags = image.tag_v2  # type: ignore[attr-defined]
    width, height = tags.get(_TIFF_IMAGE_WIDTH, 0), tags.get(_TIFF_IMAGE_LENGTH, 0)
    if _TIFF_TILE_WIDTH in tags or _TIFF_TILE_LENGTH in tags:
        tile_w, tile_h = tags.get(_TIFF_TILE_WIDTH), tags.get(_TIFF_TILE_LENGTH)
        if not isinstance(tile_w, int) or not isinstance(tile_h, int) or tile_w < 1 or tile_h < 1:
            raise InvalidImage(f"TIFF tile size {tile_w}x{tile_h} is invalid")
        if tile_w * tile_h > max_pixels:
            raise _over(f"a tile of this {width}x{height} TIFF", tile_w, tile_h, max_pixels)
        return tile_w * tile_h
    rows = tags.get(_TIFF_ROWS_PER_STRIP, height)
    rows = min(rows, height) if isinstance(rows, int) and rows > 0 else height  # libtiff clamps to the height
    return int(rows * width)  # the tags are untyped ints
