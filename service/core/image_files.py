"""Which files are images: the one list of extensions that fine-tuning, `vitserve score` and scoring jobs share.

Every format here is one Pillow decodes; hidden files and macOS resource forks (``.DS_Store``,
``__MACOSX/``) are never images, whatever their extension.
"""

from __future__ import annotations

from pathlib import PurePosixPath

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"})


def is_image_name(name: str) -> bool:
    """True for a relative name (``a/b.jpg``) with an image extension and no hidden part."""
    path = PurePosixPath(name)
    hidden = any(part.startswith(".") or part == "__MACOSX" for part in path.parts)
    return not hidden and path.suffix.lower() in IMAGE_SUFFIXES


def describe_suffixes() -> str:
    """The extensions for a message: ".bmp, .gif, .jpe, ..."."""
    return ", ".join(sorted(IMAGE_SUFFIXES))
