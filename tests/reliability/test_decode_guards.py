"""Decoding only what was allowed, and nothing bigger than the limit: in-process, on generated files.

Each class of memory bomb is tried over several sizes and encodings (the fix must hold for the
class, not for one file): TIFF tiles and strips declared larger than their image, ICO members
larger than their directory says, WebP canvases larger than their frames, GIF frames larger
than their screen. Formats outside the allow-list are refused before their decoder runs (EPS
never reaches Ghostscript). The server-level tests (test_hostile_decoding.py) add peak RSS and a
concurrent client.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess

import hostile_files as hostile
import numpy as np
import pytest
from PIL import Image

from service.core.errors import InvalidImage
from service.core.image_formats import DEFAULT_FORMATS, SUPPORTED_FORMATS, parse_formats
from service.core.metadata import Preprocessing
from service.runtime.preprocess import decode_image, load_pixels, open_image

P = Preprocessing.timm_eval(32, 0.875, "bicubic")
LIMIT = 4_000_000


def _refused(data: bytes, match: str, **kwargs) -> InvalidImage:
    with pytest.raises(InvalidImage, match=match) as caught:
        open_image(data, max_pixels=kwargs.pop("max_pixels", LIMIT), **kwargs)
    return caught.value


@pytest.mark.parametrize("compression", ["none", "lzw", "deflate", "packbits"])
@pytest.mark.parametrize(
    ("image", "tile"),
    [((16, 16), (46336, 46336)), ((16, 16), (4096, 1024)), ((300, 20), (2048, 2048)), ((1, 1), (65536, 64))],
)
def test_tiff_tile_declared_over_the_limit_is_refused_before_decoding(compression, image, tile):
    data = hostile.tiff_blocks(*image, tile=tile, compression=compression, complete=False)
    assert len(data) < 1000
    error = _refused(data, "tile")
    assert f"{tile[0]}x{tile[1]}" in error.message and str(LIMIT) in error.message


@pytest.mark.parametrize("compression", ["none", "lzw", "deflate", "packbits"])
@pytest.mark.parametrize(
    ("image", "blocks"),
    [((40, 50), {"tile": (16, 16)}), ((64, 30), {"tile": (256, 256)}), ((50, 40), {"rows_per_strip": 7})],
)
def test_tiff_tiles_and_strips_within_the_limit_decode(compression, image, blocks):
    data = hostile.tiff_blocks(*image, compression=compression, **blocks)
    decoded = np.asarray(decode_image(data, max_pixels=LIMIT))
    assert decoded.shape == (image[1], image[0], 3) and (decoded == 0x80).all()


@pytest.mark.parametrize("rows_per_strip", [2**32 - 1, 10**6, 51])
def test_tiff_strip_rows_past_the_height_are_clamped_like_libtiff(rows_per_strip):
    # libtiff sizes a strip as min(rows_per_strip, height) rows: not a bomb, must not be refused.
    data = hostile.tiff_blocks(40, 50, rows_per_strip=rows_per_strip)
    assert decode_image(data, max_pixels=LIMIT).size == (40, 50)


@pytest.mark.parametrize("member_side", [2100, 5000, 13000, 65535])
@pytest.mark.parametrize("kind", ["png", "bmp"])
def test_ico_member_larger_than_its_directory_entry_is_refused(member_side, kind):
    if kind == "png":
        member = hostile.png_claiming(member_side, member_side)
    else:  # a BITMAPINFOHEADER DIB, height doubled for the AND mask as ICO stores it
        member = (
            (40).to_bytes(4, "little") + member_side.to_bytes(4, "little") + (2 * member_side).to_bytes(4, "little")
        )
        member += b"\x01\x00\x20\x00" + b"\x00" * 24
    data = hostile.ico_embedding(member, declared=(16, 16))
    error = _refused(data, "ICO member 0", formats=(*DEFAULT_FORMATS, "ICO"))
    assert "16x16" in error.message and f"{member_side}x{member_side}" in error.message


def test_ico_is_refused_by_default_and_decodes_when_allowed():
    data = hostile.encoded("ICO", 48)
    _refused(data, "format ICO is not accepted")
    assert decode_image(data, max_pixels=LIMIT, formats=parse_formats("jpeg,png,ico")).size == (48, 48)


@pytest.mark.parametrize("canvas", [(2001, 2000), (8000, 8000), (16384, 16384), (16384, 245)])
def test_webp_canvas_over_the_limit_is_refused_before_the_decoder_allocates_it(canvas):
    data = hostile.webp_with_canvas(*canvas)
    assert len(data) < 500
    error = _refused(data, "WebP canvas")
    assert f"{canvas[0]}x{canvas[1]}" in error.message


def test_webp_canvas_within_the_limit_decodes():
    assert decode_image(hostile.webp_with_canvas(300, 200), max_pixels=LIMIT).size == (300, 200)


@pytest.mark.parametrize("claim", [(2001, 2000), (5000, 5000), (65535, 65535), (65535, 62)])
def test_gif_first_frame_larger_than_its_screen_is_refused(claim):
    _refused(hostile.gif_first_frame_claiming(*claim), "limit")


@pytest.mark.parametrize("claim", [(5000, 5000), (65535, 65535)])
def test_gif_later_frames_are_never_decoded(claim):
    # Only the first frame is classified; a bomb in frame 2 costs nothing.
    assert decode_image(hostile.gif_with_later_frame_claiming(*claim), max_pixels=LIMIT).size == (16, 16)


def test_mpo_opens_as_the_jpeg_it_is():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "blue").save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (40, 30))])
    assert load_pixels(buf.getvalue(), P, max_pixels=LIMIT).shape == (3, 32, 32)


NOT_ALLOWED = [
    "AVIF",
    "DDS",
    "DIB",
    "EPS",
    "ICNS",
    "ICO",
    "IM",
    "JPEG2000",
    "PCX",
    "PPM",
    "QOI",
    "SGI",
    "SPIDER",
    "TGA",
]


@pytest.mark.parametrize("image_format", NOT_ALLOWED)
@pytest.mark.parametrize("side", [1, 37, 256])
def test_formats_outside_the_allow_list_never_reach_their_decoder(image_format, side):
    data = hostile.encoded(image_format, side)
    with pytest.raises(InvalidImage) as caught:
        load_pixels(data, P, max_pixels=LIMIT)
    assert "not accepted" in caught.value.message or "no format" in caught.value.message
    assert "JPEG, PNG, WebP, GIF, BMP, TIFF" in caught.value.message


@pytest.mark.parametrize("allowed", [("PNG",), ("JPEG", "GIF"), ("TIFF", "BMP")])
def test_a_narrowed_allow_list_refuses_the_formats_left_out(allowed):
    for image_format in DEFAULT_FORMATS:
        data = hostile.encoded(image_format, 20)
        if image_format in allowed:
            assert decode_image(data, max_pixels=LIMIT, formats=allowed).size == (20, 20)
        else:
            with pytest.raises(InvalidImage, match="not accepted"):
                decode_image(data, max_pixels=LIMIT, formats=allowed)


def test_eps_never_runs_ghostscript(tmp_path, monkeypatch):
    marker = tmp_path / "gs-ran"
    fake_gs = tmp_path / "gs"
    fake_gs.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo 10.0 && exit 0\necho "$@" > {marker}\nexit 1\n')
    fake_gs.chmod(fake_gs.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    data = hostile.encoded("EPS", 32)
    # Control: Pillow left to itself hands this upload to whatever `gs` is on PATH.
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)
    with pytest.raises((OSError, subprocess.CalledProcessError)):  # the fake gs exits 1
        Image.open(io.BytesIO(data)).load()
    if not marker.exists():
        pytest.fail("control failed: Pillow did not run the fake gs, so this test would prove nothing")
    marker.unlink()
    with pytest.raises(InvalidImage, match="EPS is not accepted"):
        load_pixels(data, P, max_pixels=LIMIT)
    assert not marker.exists()


def test_only_formats_with_a_guard_can_be_configured():
    assert parse_formats("jpg, PNG ,tif") == ("JPEG", "PNG", "TIFF")
    for bad in ("EPS", "JPEG2000", "ICNS", "PSD", "jpeg,avif"):
        with pytest.raises(ValueError, match="cannot be allowed"):
            parse_formats(bad)
    assert set(DEFAULT_FORMATS) < set(SUPPORTED_FORMATS)
