"""Keep only the GPU code that one SM architecture can load in a CUDA shared library's ``.nv_fatbin``.

onnxruntime-gpu's CUDA provider (284 MB) carries its kernels compiled for sm_75, 80, 86, 89, 90a
and 120a; an H200 (compute capability 9.0) can load only the sm_90 ones. This rewrites each fat
binary container *in place*: the container keeps its start address (which the registration
wrappers in ``.nvFatBinSegment`` point at), its header's size shrinks to the entries kept, copied
byte for byte, and the bytes freed behind them become zeros, which compress to nothing. The ELF
file keeps its size and every byte outside ``.nv_fatbin``; nothing is relinked.

What a device of compute capability M.m can load, and so what is kept:
- ELF (SASS) entries of the same major M and a minor <= m (cubins are compatible within a major);
- PTX entries of an architecture <= M.m (the driver compiles them at load time).
A container with no entry the device can load is left as it is: its kernels could not run on that
device anyway, and leaving it untouched keeps its registration exactly as built.

Container layout (little-endian; matches every container of onnxruntime-gpu 1.31.1's library,
and public descriptions of the format such as nvopen-tools' FORMAT_SPECIFICATION.md):
  header, 16 bytes: magic 0xBA55ED50 (u32), version (u16), header size (u16), entries' size (u64)
  entry:  kind (u16: 1 PTX, 2 ELF), version (u16), entry header size (u32), padded payload size
          (u64), ..., architecture at offset 28 (u32, e.g. 90 for sm_90 and sm_90a); the payload
          follows the entry header, the next entry follows the padded payload.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

FATBIN_MAGIC = 0xBA55ED50
_MAGIC_BYTES = struct.pack("<I", FATBIN_MAGIC)
KIND_PTX, KIND_ELF = 1, 2
SECTION = ".nv_fatbin"


class FatbinError(ValueError):
    """The file is not laid out as this module expects (nothing is written then)."""


@dataclass(frozen=True)
class Entry:
    offset: int  # of the entry header, in the file
    kind: int
    arch: int
    header_size: int
    padded_size: int

    @property
    def end(self) -> int:
        return self.offset + self.header_size + self.padded_size


@dataclass(frozen=True)
class Container:
    offset: int
    header_size: int
    entries: tuple[Entry, ...]

    @property
    def end(self) -> int:
        return self.entries[-1].end if self.entries else self.offset + self.header_size


@dataclass
class PruneReport:
    arch: int
    containers: int = 0
    pruned: int = 0
    untouched: int = 0  # no entry the device can load
    kept_bytes: int = 0
    zeroed_bytes: int = 0
    entries_by_arch: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        archs = ", ".join(f"sm_{a}: {n}" for a, n in sorted(self.entries_by_arch.items()))
        return (
            f"{self.containers} containers ({archs}); kept sm_{self.arch}-loadable entries in {self.pruned}, "
            f"{self.untouched} left as built (nothing for sm_{self.arch}); {self.kept_bytes / 1e6:.1f} MB kept, "
            f"{self.zeroed_bytes / 1e6:.1f} MB zeroed"
        )


def elf_section(data: bytes | bytearray, name: str = SECTION) -> tuple[int, int] | None:
    """(file offset, size) of the named section of a 64-bit little-endian ELF file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise FatbinError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shnum == 0:
        return None

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        (name_at,) = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name_at, offset, size

    _, strtab, _ = header(shstrndx)
    for i in range(shnum):
        name_at, offset, size = header(i)
        end = data.index(b"\0", strtab + name_at)
        if data[strtab + name_at : end].decode() == name:
            return offset, size
    return None


def containers(data: bytes | bytearray, start: int, size: int) -> Iterator[Container]:
    """The fat binary containers in data[start:start+size]; zero padding between them is skipped."""
    pos, stop = start, start + size
    while pos < stop:
        if stop - pos < 16 or struct.unpack_from("<I", data, pos)[0] != FATBIN_MAGIC:
            # Zeros between containers: alignment padding, or what prune() freed.
            found = data.find(_MAGIC_BYTES, pos, stop)
            found = stop if found < 0 else found
            if data.count(0, pos, found) != found - pos:
                raise FatbinError(f"no fat binary container at offset {pos:#x}")
            pos = found
            continue
        _, _, header_size, entries_size = struct.unpack_from("<IHHQ", data, pos)
        end = pos + header_size + entries_size
        if end > stop:
            raise FatbinError(f"container at {pos:#x} runs past the section")
        entries, at = [], pos + header_size
        while at < end:
            kind, _, entry_header, padded = struct.unpack_from("<HHIQ", data, at)
            (arch,) = struct.unpack_from("<I", data, at + 28)
            if entry_header < 64:
                raise FatbinError(f"entry at {at:#x}: header of {entry_header} bytes")
            entries.append(Entry(at, kind, arch, entry_header, padded))
            at = entries[-1].end
        if at != end:
            raise FatbinError(f"container at {pos:#x}: entries end at {at:#x}, header says {end:#x}")
        yield Container(pos, header_size, tuple(entries))
        pos = end


def loadable(entry: Entry, arch: int) -> bool:
    """Can a device of compute capability arch (e.g. 90 = 9.0) load this entry?"""
    if entry.kind == KIND_ELF:
        return entry.arch // 10 == arch // 10 and entry.arch <= arch
    if entry.kind == KIND_PTX:
        return entry.arch <= arch
    return False


def prune(data: bytes | bytearray, arch: int) -> tuple[bytearray, PruneReport]:
    """A copy of the ELF file ``data`` whose fat binaries hold only what sm_``arch`` can load."""
    where = elf_section(data)
    if where is None:
        raise FatbinError(f"no {SECTION} section")
    out = bytearray(data)
    report = PruneReport(arch)
    for container in containers(data, *where):
        report.containers += 1
        report.entries_by_arch.update(e.arch for e in container.entries)
        kept = [e for e in container.entries if loadable(e, arch)]
        if not kept:
            report.untouched += 1
            continue
        body = b"".join(bytes(data[e.offset : e.end]) for e in kept)
        first, end = container.offset + container.header_size, container.end
        out[first:end] = body + bytes(end - first - len(body))
        struct.pack_into("<Q", out, container.offset + 8, len(body))
        report.pruned += 1
        report.kept_bytes += len(body)
        report.zeroed_bytes += end - first - len(body)
    return out, report


def verify(original: bytes | bytearray, pruned: bytes | bytearray, arch: int) -> None:
    """Raise FatbinError unless ``pruned`` is exactly what ``prune(original, arch)`` promises: the same
    bytes outside the section, every loadable entry byte-identical, nothing else left in a pruned container."""
    where = elf_section(original)
    if where is None or elf_section(pruned) != where or len(original) != len(pruned):
        raise FatbinError("section table or file size differ")
    start, size = where
    if original[:start] != pruned[:start] or original[start + size :] != pruned[start + size :]:
        raise FatbinError(f"bytes outside {SECTION} differ")
    after = {c.offset: c for c in containers(pruned, start, size)}
    for before in containers(original, start, size):
        kept = [e for e in before.entries if loadable(e, arch)]
        now = after.get(before.offset)
        if now is None:
            raise FatbinError(f"container at {before.offset:#x} is gone")
        if not kept:
            if original[before.offset : before.end] != pruned[before.offset : before.end]:
                raise FatbinError(f"container at {before.offset:#x} has nothing for sm_{arch} but was changed")
            continue
        if len(now.entries) != len(kept):
            raise FatbinError(f"container at {before.offset:#x}: {len(now.entries)} entries, expected {len(kept)}")
        for old, new in zip(kept, now.entries, strict=True):
            if original[old.offset : old.end] != pruned[new.offset : new.end]:
                raise FatbinError(f"entry at {old.offset:#x} (sm_{old.arch}) differs after pruning")
        if any(pruned[now.end : before.end]):
            raise FatbinError(f"container at {before.offset:#x}: freed bytes are not zero")
