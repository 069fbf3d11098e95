"""Hostile files, generated: decompression bombs, truncated and corrupt images, zip bombs, archives
with path traversal, links and devices, multipart bodies with thousands of parts.

Plain functions returning bytes; the tests in test_hostile_inputs.py send them to a real server.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
import zlib

from PIL import Image


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, followed by a few bytes of data."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(photo_jpeg: bytes, width: int, height: int) -> bytes:
    """A real baseline JPEG with its SOF0 frame header rewritten to claim width x height."""
    data = bytearray(photo_jpeg)
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "not a baseline JPEG"
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")  # SOF0: length(2) precision(1) height(2) width(2)
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def png_bomb_under_limit(side: int) -> bytes:
    """A real side x side all-black PNG: tens of KB that decode to side^2 pixels (within the limit)."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def corrupt_png(photo_png: bytes) -> bytes:
    """Valid header and chunk CRCs, garbage compressed pixel data."""
    data = bytearray(photo_png)
    idat = data.find(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    garbage = bytes((i * 97 + 13) % 256 for i in range(length))
    data[idat + 4 : idat + 4 + length] = garbage
    data[idat + 4 + length : idat + 8 + length] = zlib.crc32(b"IDAT" + garbage).to_bytes(4, "big")
    return bytes(data)


def zip_bomb(uncompressed_bytes: int, name: str = "bomb.png") -> bytes:
    """One member of zeros: ~1000:1 compression, far past any sane expansion ratio."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open(zipfile.ZipInfo(name), "w", force_zip64=True) as member:
            block = b"\x00" * (1 << 20)
            for _ in range(uncompressed_bytes // len(block)):
                member.write(block)
    return buf.getvalue()


def zip_with(entries: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    """A zip holding ``entries`` (names used verbatim: '../x' stays '../x') and symlink members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo("placeholder")
            info.filename = name  # ZipInfo() would normalise the name; hostile archives do not
            archive.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buf.getvalue()


def corrupt_zip(entries: dict[str, bytes]) -> bytes:
    """A well-formed zip directory whose deflated member data is garbage."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    data = bytearray(buf.getvalue())
    start = 30 + len(next(iter(entries)))  # first local header (30 bytes) + its name: member data begins
    for i in range(start + 2, start + 40):
        data[i] ^= 0x5A
    return bytes(data)


def tar_with(
    entries: dict[str, bytes],
    *,
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
    fifos: tuple[str, ...] = (),
    gzip: bool = False,
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gzip else "w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks or {}), (tarfile.LNKTYPE, hardlinks or {})):
            for name, target in links.items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                archive.addfile(info)
        for name in fifos:
            info = tarfile.TarInfo(name)
            info.type = tarfile.FIFOTYPE
            archive.addfile(info)
    return buf.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "reliabilityboundary") -> tuple[bytes, str]:
    """(body, content type) for (field name, file name or None for a plain field, content) parts."""
    chunks = []
    for field, filename, content in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def zip_patched(entries: dict[str, bytes], *, method: int | None = None, encrypted: bool = False) -> bytes:
    """A stored zip whose local and central headers are patched to claim another compression
    method (e.g. 99, AES) or the 'encrypted' flag: members zipfile cannot read."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    data = bytearray(buf.getvalue())
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.find(signature)
        while at >= 0:
            if encrypted:
                data[at + flag_at] |= 0x1
            if method is not None:
                data[at + method_at : at + method_at + 2] = method.to_bytes(2, "little")
            at = data.find(signature, at + 4)
    return bytes(data)
