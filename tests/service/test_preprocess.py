"""Pre-processing against the references on real photographs, and every awkward image format.

References: timm's eval transform (create_transform(**resolve_data_config(...))) and Hugging
Face's ViTImageProcessor (PIL backend, and the default torchvision backend), each fed the same
decoded photo. Bounds reached: 0.0 max abs diff vs timm and vs ViTImageProcessorPil; one uint8
level (2/255 after std 0.5) vs the torchvision-backed ViTImageProcessor, whose tensor resize
rounds differently from Pillow's.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.core.errors import InvalidImage
from service.core.metadata import Preprocessing
from service.runtime.preprocess import decode_image, load_pixels, preprocess, resize_and_crop

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
BIG = 10**8


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _encode(array_or_image, fmt: str, **kwargs) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoded_photos() -> dict[tuple[str, str], bytes]:
    return {(name, fmt): _encode(_photo(name), fmt) for name in PHOTOS for fmt in ("JPEG", "PNG")}


TIMM_CASES = [  # (image size, crop_pct, interpolation, mean, std): ViT-ImageNet, DeiT, augreg-style
    (224, 0.9, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    (224, 0.875, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    (384, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
]


@pytest.mark.parametrize("size,crop_pct,interpolation,mean,std", TIMM_CASES)
def test_matches_timm_eval_transform_on_photos(encoded_photos, size, crop_pct, interpolation, mean, std):
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(
        {"input_size": (3, size, size), "crop_pct": crop_pct, "interpolation": interpolation, "mean": mean, "std": std}
    )
    reference = create_transform(**config)
    p = Preprocessing.timm_eval(size, crop_pct, interpolation, mean, std)
    for (name, fmt), data in encoded_photos.items():
        expected = reference(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
        ours = load_pixels(data, p, max_pixels=BIG)
        assert ours.shape == (3, size, size) and ours.dtype == np.float32
        assert np.abs(ours - expected).max() == 0.0, f"{name} {fmt}"


def test_matches_timm_eval_transform_on_portrait_and_rescaled_photos():
    # The photos above are landscape or square; the crop's columns are dropped between Pillow's two
    # resize passes (service/runtime/preprocess.py), so portraits and up/down-scaled ones are checked too.
    from timm.data import create_transform, resolve_data_config

    size, crop_pct, interpolation, mean, std = TIMM_CASES[0]
    config = resolve_data_config(
        {"input_size": (3, size, size), "crop_pct": crop_pct, "interpolation": interpolation, "mean": mean, "std": std}
    )
    reference = create_transform(**config)
    p = Preprocessing.timm_eval(size, crop_pct, interpolation, mean, std)
    for name in ("coffee", "rocket"):
        photo = Image.fromarray(_photo(name)).convert("RGB")
        for image in (photo.transpose(Image.Transpose.TRANSPOSE), photo.resize((203, 131)), photo.resize((1013, 677))):
            data = _encode(image, "PNG")
            expected = reference(image).numpy()
            ours = load_pixels(data, p, max_pixels=BIG)
            assert np.abs(ours - expected).max() == 0.0, f"{name} {image.size}"


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_resize_and_crop_equals_one_full_resize_then_the_crop(interpolation):
    resample = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}[interpolation]
    p = Preprocessing.timm_eval(224, 0.9, interpolation)
    photo = Image.fromarray(_photo("chelsea")).convert("RGB")
    for image in (photo, photo.transpose(Image.Transpose.TRANSPOSE), photo.resize((611, 257)), photo.convert("L")):
        width, height = image.size
        new_w, new_h = (248, int(248 * height / width)) if width <= height else (int(248 * width / height), 248)
        left, top = int(round((new_w - 224) / 2.0)), int(round((new_h - 224) / 2.0))
        full = image.resize((new_w, new_h), resample).crop((left, top, left + 224, top + 224))
        ours = resize_and_crop(image, p)
        assert ours.size == (224, 224) and ours.mode == image.mode
        assert np.array_equal(np.asarray(ours), np.asarray(full)), f"{image.size} {image.mode}"


def test_matches_hugging_face_vit_image_processor(encoded_photos):
    from transformers import ViTImageProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    pil_reference, torchvision_reference = ViTImageProcessorPil(), ViTImageProcessor()
    p = Preprocessing.hf_vit(224)
    for (name, fmt), data in encoded_photos.items():
        image = Image.open(io.BytesIO(data)).convert("RGB")
        ours = load_pixels(data, p, max_pixels=BIG)
        exact = pil_reference(image, return_tensors="np")["pixel_values"][0]
        assert np.abs(ours - exact).max() == 0.0, f"{name} {fmt}"
        approx = np.asarray(torchvision_reference(image, return_tensors="pt")["pixel_values"][0])
        diff = np.abs(ours - approx)
        assert diff.max() <= 2 / 255 + 1e-6 and diff.mean() < 1e-4, f"{name} {fmt}: {diff.max()}"


def test_extreme_aspect_ratio_resizes_only_the_crop():
    strip = np.tile(np.linspace(0, 255, 4000, dtype=np.uint8)[None, :, None], (7, 1, 3))  # 4000 x 7
    p = Preprocessing.timm_eval(224, 0.9, "bicubic")
    ours = load_pixels(_encode(strip, "PNG"), p, max_pixels=BIG)
    assert ours.shape == (3, 224, 224)
    # The full resize (248 x 141714 px) done by hand: the crop path stays within one uint8 level.
    image = Image.fromarray(strip)
    new_w = int(248 * 4000 / 7)
    full = image.resize((new_w, 248), Image.Resampling.BICUBIC)
    left = int(round((new_w - 224) / 2.0))
    full = np.asarray(full.crop((left, 12, left + 224, 236)), dtype=np.float32) / 255
    ours_levels = ours.transpose(1, 2, 0) * np.float32(p.std) + np.float32(p.mean)
    assert np.abs(ours_levels - full).max() <= 1 / 255 + 1e-5


def test_one_pixel_image():
    data = _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    out = load_pixels(data, Preprocessing.timm_eval(224), max_pixels=BIG)
    assert out.shape == (3, 224, 224)
    levels = np.array([10, 200, 30], np.float32) / np.float32(255)
    expected = (levels - np.array((0.485, 0.456, 0.406), np.float32)) / np.array((0.229, 0.224, 0.225), np.float32)
    assert np.array_equal(out, np.broadcast_to(expected[:, None, None], out.shape))  # a flat colour stays flat


def test_cmyk_jpeg_converts_like_pillow():
    cmyk = Image.fromarray(_photo("coffee")).convert("CMYK")
    decoded = decode_image(_encode(cmyk, "JPEG"), max_pixels=BIG)
    assert decoded.mode == "RGB" and decoded.size == cmyk.size
    reference = Image.open(io.BytesIO(_encode(cmyk, "JPEG"))).convert("RGB")
    assert np.array_equal(np.asarray(decoded), np.asarray(reference))


def test_sixteen_bit_png_scales_to_eight_bits():
    gray16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    data = _encode(Image.fromarray(gray16), "PNG")
    decoded = np.asarray(decode_image(data, max_pixels=BIG))
    expected = np.round(gray16 / 257.0).astype(np.uint8)
    assert np.array_equal(decoded[:, :, 0], expected) and np.array_equal(decoded[:, :, 2], expected)


def test_palette_png_with_transparency_is_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))  # left half red, right half palette index 0 (black)...
    image.info["transparency"] = 0  # ...which is transparent
    decoded = np.asarray(decode_image(_encode(image, "PNG", transparency=0), max_pixels=BIG))
    assert tuple(decoded[0, 0]) == (255, 0, 0)
    assert tuple(decoded[0, 7]) == (255, 255, 255)


def test_rgba_half_transparent_blends_with_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    decoded = np.asarray(decode_image(_encode(image, "PNG"), max_pixels=BIG))
    assert abs(int(decoded[0, 0, 0]) - 127) <= 1


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = np.asarray(decode_image(buf.getvalue(), max_pixels=BIG))
    assert tuple(decoded[8, 8]) == (255, 0, 0)


def test_exif_orientation_is_applied():
    array = _photo("chelsea")  # 300 x 451, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(array, "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, max_pixels=BIG)
    assert decoded.size == (300, 451)  # shown upright: portrait


def test_webp_bmp_tiff_decode(encoded_photos):
    array = _photo("astronaut")[:64, :96]
    for fmt in ("WEBP", "BMP", "TIFF"):
        decoded = decode_image(_encode(array, fmt), max_pixels=BIG)
        assert decoded.size == (96, 64) and decoded.mode == "RGB", fmt


def test_pixel_limit_is_checked_before_decoding():
    data = _encode(Image.new("L", (5000, 5000)), "PNG")  # 25 Mpx, a tiny file: a decompression bomb
    with pytest.raises(InvalidImage, match="25000000 pixels"):
        decode_image(data, max_pixels=1_000_000)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not an image"),
    ],
)
def test_not_an_image(data, match):
    with pytest.raises(InvalidImage, match=match):
        decode_image(data, max_pixels=BIG)


def test_truncated_jpeg(encoded_photos):
    data = encoded_photos[("astronaut", "JPEG")]
    with pytest.raises(InvalidImage, match="cannot decode|truncated"):
        decode_image(data[: len(data) // 2], max_pixels=BIG)


def test_resize_and_crop_squash_mode_has_exact_size():
    image = Image.fromarray(_photo("rocket"))
    out = resize_and_crop(image, Preprocessing.hf_vit(160))
    assert out.size == (160, 160)
    assert preprocess(image, Preprocessing.hf_vit(160)).shape == (3, 160, 160)


def test_jpeg_draft_only_for_large_jpegs_and_close_to_the_full_decode():
    p = Preprocessing.timm_eval(224, 0.9, "bicubic")
    small = _encode(_photo("rocket"), "JPEG", quality=92)  # 640 x 427: below 4 x 248, never drafted
    assert np.array_equal(load_pixels(small, p, max_pixels=BIG, jpeg_draft=True), load_pixels(small, p, max_pixels=BIG))
    big_image = Image.fromarray(_photo("astronaut")).resize((2048, 2048), Image.Resampling.LANCZOS)
    big = _encode(big_image, "JPEG", quality=92)
    assert decode_image(big, max_pixels=BIG, min_short_side=2 * 248).size == (512, 512)  # 1/4 in the DCT
    exact = load_pixels(big, p, max_pixels=BIG)
    drafted = load_pixels(big, p, max_pixels=BIG, jpeg_draft=True)
    diff = np.abs(drafted - exact)
    assert diff.mean() < 0.01 and diff.max() < 0.2, (diff.mean(), diff.max())
