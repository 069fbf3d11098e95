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


# -- files whose decode cost their header size does not show -----------------------------------
_TIFF_COMPRESSION = {"none": 1, "lzw": 5, "deflate": 8, "packbits": 32773}


def tiff_blocks(
    width: int,
    height: int,
    *,
    tile: tuple[int, int] | None = None,
    rows_per_strip: int | None = None,
    compression: str = "deflate",
    complete: bool = True,
) -> bytes:
    """A little-endian 8-bit grey TIFF, tiled (``tile``) or in strips (``rows_per_strip``).

    ``complete`` writes every block's data (a valid file); otherwise one block of a few bytes
    follows a header that still declares the full block size (the memory bomb: libtiff sizes its
    buffer from the declared tile, not from the data).
    """
    import struct

    if tile is not None:
        block_w, block_h = tile
        count = -(-width // block_w) * -(-height // block_h)
    else:
        block_w, block_h = width, min(rows_per_strip or height, height)
        count = -(-height // block_h)
    if compression == "deflate":
        pack = zlib.compress
    elif compression == "lzw":
        pack = _tiff_lzw
    elif compression == "packbits":
        pack = _packbits
    else:
        pack = bytes
    blocks = [pack(b"\x80" * (block_w * block_h)) for _ in range(count)] if complete else [pack(b"\x80" * 64)]
    offsets_tag, counts_tag = (324, 325) if tile is not None else (273, 279)
    entries: list[tuple[int, int, list[int]]] = [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [8]),
        (259, 3, [_TIFF_COMPRESSION[compression]]),
        (262, 3, [1]),
        (277, 3, [1]),
        (offsets_tag, 4, []),
        (counts_tag, 4, [len(b) for b in blocks]),
    ]
    if tile is not None:
        entries += [(322, 4, [block_w]), (323, 4, [block_h])]
    else:
        entries.append((278, 4, [rows_per_strip or height]))
    entries.sort()
    ifd_size = 2 + 12 * len(entries) + 4
    arrays_at = 8 + ifd_size  # values over 4 bytes live after the IFD
    array_bytes = sum(4 * len(v) for _, _, v in entries if len(v) > 1) + (4 * len(blocks) if len(blocks) > 1 else 0)
    data_at = arrays_at + array_bytes
    offsets, at = [], data_at
    for block in blocks:
        offsets.append(at)
        at += len(block)
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    extra = bytearray()
    for tag, kind, values in entries:
        values = offsets if tag == offsets_tag else values
        if len(values) == 1:
            packed = struct.pack("<HH", values[0], 0) if kind == 3 else struct.pack("<I", values[0])
        else:
            packed = struct.pack("<I", arrays_at + len(extra))
            extra += struct.pack(f"<{len(values)}I", *values)
        out += struct.pack("<HHI", tag, kind, len(values)) + packed
    out += struct.pack("<I", 0) + extra + b"".join(blocks)
    return bytes(out)


def _packbits(data: bytes) -> bytes:
    out = bytearray()
    for i in range(0, len(data), 128):
        run = data[i : i + 128]
        out += bytes([257 - len(run)]) + run[:1] if len(set(run)) == 1 and len(run) > 1 else bytes([len(run) - 1]) + run
    return bytes(out)


def _tiff_lzw(data: bytes) -> bytes:
    """TIFF LZW (MSB-first codes, 9-12 bits, early change), enough for test images."""
    clear, eoi = 256, 257
    table = {bytes([i]): i for i in range(256)}
    next_code, width = 258, 9
    bits, nbits, out = 0, 0, bytearray()

    def emit(code: int) -> None:
        nonlocal bits, nbits
        bits = (bits << width) | code
        nbits += width
        while nbits >= 8:
            nbits -= 8
            out.append((bits >> nbits) & 0xFF)

    emit(clear)
    current = b""
    for value in data:
        candidate = current + bytes([value])
        if candidate in table:
            current = candidate
            continue
        emit(table[current])
        table[candidate] = next_code
        next_code += 1
        if next_code == 4094:  # table full: start over (as libtiff's encoder does)
            emit(clear)
            table = {bytes([i]): i for i in range(256)}
            next_code, width = 258, 9
        elif next_code > (1 << width) - 1:  # as libtiff: the decoder, one code behind, widens early
            width += 1
        current = bytes([value])
    if current:
        emit(table[current])
    emit(eoi)
    if nbits:
        out.append((bits << (8 - nbits)) & 0xFF)
    return bytes(out)


def ico_embedding(member: bytes, *, declared: tuple[int, int] = (16, 16)) -> bytes:
    """An ICO whose one directory entry says ``declared`` but holds ``member`` (a PNG, say, of any size)."""
    width, height = (0 if d >= 256 else d for d in declared)
    entry = bytes([width, height, 0, 0]) + (1).to_bytes(2, "little") + (32).to_bytes(2, "little")
    entry += len(member).to_bytes(4, "little") + (6 + 16).to_bytes(4, "little")
    return b"\x00\x00\x01\x00" + (1).to_bytes(2, "little") + entry + member


def webp_with_canvas(width: int, height: int, frame_side: int = 16) -> bytes:
    """An animated WebP of two small frames on a canvas declared ``width`` x ``height``."""
    frames = [Image.new("RGB", (frame_side, frame_side), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buf.getvalue())
    at = data.find(b"VP8X")
    data[at + 12 : at + 15] = (width - 1).to_bytes(3, "little")
    data[at + 15 : at + 18] = (height - 1).to_bytes(3, "little")
    return bytes(data)


def _gif_descriptors(data: bytes) -> list[int]:
    """Offsets of every image descriptor (0x2C) of a GIF, found by walking its blocks."""

    def skip_sub_blocks(at: int) -> int:
        while data[at]:
            at += 1 + data[at]
        return at + 1

    flags = data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    found = []
    while data[at] != 0x3B:
        if data[at] == 0x21:  # extension: label, then sub-blocks
            at = skip_sub_blocks(at + 2)
        else:  # image descriptor, local colour table, LZW code size, sub-blocks
            found.append(at)
            local = data[at + 9]
            at += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            at = skip_sub_blocks(at + 1)
    return found


def _gif_claiming(frames: int, which: int, width: int, height: int, side: int) -> bytes:
    images = [Image.new("RGB", (side, side), ("red", "blue", "green")[i % 3]) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=frames > 1, append_images=images[1:])
    data = bytearray(buf.getvalue())
    at = _gif_descriptors(bytes(data))[which]
    data[at + 5 : at + 7] = width.to_bytes(2, "little")
    data[at + 7 : at + 9] = height.to_bytes(2, "little")
    return bytes(data)


def gif_with_later_frame_claiming(width: int, height: int, side: int = 16) -> bytes:
    """A two-frame GIF whose second frame's descriptor claims ``width`` x ``height`` pixels."""
    return _gif_claiming(2, 1, width, height, side)


def gif_first_frame_claiming(width: int, height: int, side: int = 16) -> bytes:
    """A GIF whose logical screen is ``side`` square and whose first frame claims ``width`` x ``height``."""
    return _gif_claiming(1, 0, width, height, side)


def encoded(image_format: str, side: int = 32, mode: str = "RGB") -> bytes:
    """A small real image in ``image_format`` (as Pillow writes it)."""
    buf = io.BytesIO()
    Image.new(mode, (side, side), "red" if mode == "RGB" else 128).save(buf, image_format)
    return buf.getvalue()
