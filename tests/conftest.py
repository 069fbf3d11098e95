"""Fixtures shared by every test package. Keep this small: package-specific fixtures live next to their tests."""

from __future__ import annotations

import numpy as np
import pytest

# Real photographs shipped with scikit-image: correctness is checked on these, not on noise.
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="session")
def photo_arrays() -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8 RGB photograph, of several sizes and aspect ratios."""
    from skimage import data

    return {name: np.ascontiguousarray(getattr(data, name)()[..., :3]) for name in PHOTO_NAMES}
