"""Default input limits shared by the online service (settings) and offline scoring."""

from __future__ import annotations

# Largest decoded image, width x height: a 40 MP photograph passes, a decompression bomb does not.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
