"""bench/carry/fatbin.py on synthetic ELF files: what an sm_90 device loads is kept byte for byte, the rest
zeroed in place, and anything not laid out as expected is refused."""

from __future__ import annotations

import struct

import pytest

from bench.carry.fatbin import KIND_ELF, KIND_PTX, FatbinError, containers, elf_section, prune, verify

HOST_CODE = bytes(range(256)) * 4  # stands in for .text: must come through untouched


def entry(kind: int, arch: int, payload: bytes) -> bytes:
    padded = -(-len(payload) // 8) * 8
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x0101, 64, padded)
    struct.pack_into("<I", header, 16, len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload + bytes(padded - len(payload))


def container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def elf_with(section: bytes, name: str = ".nv_fatbin") -> bytes:
    """A 64-bit little-endian ELF file: header, host code, the section, a name table, section headers."""
    names = b"\0" + name.encode() + b"\0.shstrtab\0"
    section_at = 64 + len(HOST_CODE)
    names_at = section_at + len(section)
    headers_at = names_at + len(names)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = bytearray(ident + bytes(64 - len(ident)))
    struct.pack_into("<Q", header, 0x28, headers_at)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)

    def section_header(name_at: int, offset: int, size: int) -> bytes:
        raw = bytearray(64)
        struct.pack_into("<I", raw, 0, name_at)
        struct.pack_into("<QQ", raw, 0x18, offset, size)
        return bytes(raw)

    table = (
        bytes(64) + section_header(1, section_at, len(section)) + section_header(len(name) + 2, names_at, len(names))
    )
    return bytes(header) + HOST_CODE + section + names + table


SM80 = entry(KIND_ELF, 80, b"sass for sm_80" * 5)
SM90 = entry(KIND_ELF, 90, b"sass for sm_90a, kept" * 7)
SM120 = entry(KIND_ELF, 120, b"sass for sm_120a" * 3)
PTX80 = entry(KIND_PTX, 80, b".version 8.0 .target sm_80")


def test_keeps_what_sm90_loads_and_zeroes_the_rest_in_place():
    mixed = container(SM80, SM90, SM120)
    blackwell_only = container(SM120)
    data = elf_with(mixed + blackwell_only + container(PTX80, SM80))
    pruned, report = prune(data, 90)
    verify(data, pruned, 90)
    assert len(pruned) == len(data)
    start, size = elf_section(data)
    assert pruned[:start] == data[:start] and pruned[start + size :] == data[start + size :]
    after = list(containers(pruned, start, size))
    # Same start addresses (the registration wrappers point there); each holds what sm_90 can load.
    assert [c.offset for c in after] == [start, start + len(mixed), start + len(mixed) + len(blackwell_only)]
    assert [(e.kind, e.arch) for e in after[0].entries] == [(KIND_ELF, 90)]
    assert pruned[after[0].entries[0].offset : after[0].entries[0].end] == SM90
    assert [e.arch for e in after[1].entries] == [120]  # nothing for sm_90: left as built
    assert [(e.kind, e.arch) for e in after[2].entries] == [(KIND_PTX, 80)]  # PTX the driver can compile
    assert report.pruned == 2 and report.untouched == 1 and report.containers == 3
    freed = pruned[after[0].end : start + len(mixed)]
    assert freed == bytes(len(freed)) and len(freed) == len(SM80) + len(SM120)
    assert report.zeroed_bytes == len(SM80) + len(SM120) + len(SM80)


def test_sass_is_kept_within_its_major_only():
    sm86 = entry(KIND_ELF, 86, b"sass for sm_86" * 2)
    data = elf_with(container(SM80, sm86, SM90))
    start, size = elf_section(data)
    for arch, kept in ((86, [80, 86]), (80, [80]), (90, [90]), (89, [80, 86])):
        pruned, _ = prune(data, arch)
        verify(data, pruned, arch)
        assert [e.arch for c in containers(pruned, start, size) for e in c.entries] == kept


def test_zero_padding_between_containers_is_read_past():
    data = elf_with(container(SM90) + bytes(24) + container(SM80, SM90))
    pruned, report = prune(data, 90)
    verify(data, pruned, 90)
    assert report.containers == 2 and report.pruned == 2


def test_verify_catches_a_changed_byte_in_a_kept_entry():
    data = elf_with(container(SM80, SM90))
    pruned, _ = prune(data, 90)
    damaged = bytearray(pruned)
    damaged[elf_section(data)[0] + 16 + 64 + 3] ^= 1  # inside the kept sm_90 payload
    with pytest.raises(FatbinError, match="differs"):
        verify(data, damaged, 90)
    outside = bytearray(pruned)
    outside[70] ^= 1  # host code
    with pytest.raises(FatbinError, match="outside"):
        verify(data, outside, 90)


def test_refuses_what_it_does_not_understand():
    with pytest.raises(FatbinError, match="ELF"):
        prune(b"MZ not an ELF file" + bytes(64), 90)
    with pytest.raises(FatbinError, match="no .nv_fatbin"):
        prune(elf_with(container(SM90), name=".rodata"), 90)
    with pytest.raises(FatbinError, match="no fat binary container"):
        prune(elf_with(container(SM90) + b"junk but not zeros"), 90)
    truncated = bytearray(container(SM80, SM90))
    struct.pack_into("<Q", truncated, 8, len(truncated))  # says more than the section holds
    with pytest.raises(FatbinError, match="past the section"):
        prune(elf_with(bytes(truncated)), 90)
