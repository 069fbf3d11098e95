"""The image formats the service may decode, by Pillow's names (pure: no Pillow import).

Only formats whose decode cost service/runtime/decode_guards.py reads from their headers before
decoding can be allowed; the default is what the README documents.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Others cannot be allowed: ICNS embeds JPEG 2000, EPS runs Ghostscript, PSD has layers, and
# nothing here bounds what their decoders do before they do it.
SUPPORTED_FORMATS = (*DEFAULT_FORMATS, "ICO")
_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    """A comma list (or iterable) of format names -> Pillow's names, upper case; ValueError names a bad one."""
    parts = text.split(",") if isinstance(text, str) else text
    names = [_ALIASES.get(n.strip().upper(), n.strip().upper()) for n in parts if n.strip()]
    unknown = [n for n in names if n not in SUPPORTED_FORMATS]
    if unknown:
        raise ValueError(
            f"image format(s) {unknown} cannot be allowed: this server decodes only formats whose decode cost "
            f"it checks before decoding ({', '.join(SUPPORTED_FORMATS)})"
        )
    if not names:
        raise ValueError("at least one image format must be allowed")
    return tuple(dict.fromkeys(names))


def describe(formats: Iterable[str]) -> str:
    """'JPEG, PNG, WebP, ...' for messages."""
    return ", ".join("WebP" if f == "WEBP" else f for f in formats)
