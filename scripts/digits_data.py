"""scikit-learn's handwritten digits rendered as image files: the data of the bundled demo model.

Used by scripts/train_digits.py (which trains models/digits/) and by the tests that measure that
model on its held-out images. Not part of the library: scikit-learn is a test dependency only.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from model.datasets import LabeledFiles, scan_image_folder, stratified_split
from service.core.metadata import Preprocessing
from service.runtime.preprocess import load_pixels

DIGITS_SIZE = 32
DIGITS_HELDOUT_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def render_digit(values: np.ndarray, size: int = DIGITS_SIZE) -> Image.Image:
    """An 8x8 digits sample (ink 0..16) -> RGB image: dark ink on white, upsampled smoothly.

    Dark on white so that a digit drawn on a white canvas in the web page looks like the data.
    """
    ink = np.clip(np.asarray(values, dtype=np.float64) / 16.0, 0.0, 1.0)  # (8, 8)
    gray = Image.fromarray(np.round(255.0 * (1.0 - ink)).astype(np.uint8), "L")
    return gray.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def digits_split() -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """(images (1797, 8, 8), targets, train indices, held-out indices): the demo model's fixed split.

    20% of every digit is held out with a fixed seed; the demo model never trains on it and the
    tests measure accuracy on it.
    """
    digits = load_digits()
    train, held = stratified_split(digits.target.tolist(), DIGITS_HELDOUT_FRACTION, DIGITS_SPLIT_SEED)
    return digits.images, digits.target, train, held


def heldout_digit_pixels(preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, H, W) held-out digits as PNG bytes through the service's own pre-processing, and their targets.

    What the demo model's accuracy is measured on: the exact pixels a client's PNG would become.
    """
    images, targets, _, held = digits_split()
    pixels = []
    for i in held:
        buffer = io.BytesIO()
        render_digit(images[i]).save(buffer, "PNG")
        pixels.append(load_pixels(buffer.getvalue(), preprocessing, max_pixels=1 << 20))
    return np.stack(pixels), targets[held]


def write_digits_folder(root: str | Path, indices: Sequence[int], size: int = DIGITS_SIZE) -> LabeledFiles:
    """Render the chosen digits samples as PNG files in ImageFolder layout: root/<digit>/<index>.png."""
    images, targets, _, _ = digits_split()
    root = Path(root)
    for i in indices:
        folder = root / str(int(targets[i]))
        folder.mkdir(parents=True, exist_ok=True)
        render_digit(images[i], size).save(folder / f"{i:04d}.png")
    return scan_image_folder(root)
