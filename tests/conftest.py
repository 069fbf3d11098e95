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


@pytest.fixture(autouse=True)
def _logging_as_before():
    """A test that runs a CLI command in-process (`serve`) configures logging for the whole process:
    put the root logger back, so the next test's stderr holds only its own lines."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
