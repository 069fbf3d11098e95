"""Deterministic tar.xz archives, split into parts that each fit one device call, and their unpacking there.

A device call carries the working tree plus the paths it names, 64 MiB in all, and the machine
goes back after 30 s idle: so the parts are as large as a call allows, each call's share is
planned here (``plan_calls``), and on the machine every call first moves its parts out of the
working tree copy (``stash``) into a folder that outlives the call, where an archive is unpacked
(``unpack``) once all its parts are there and their SHA-256 matches the manifest.

Only the standard library: the GPU machine's python3 runs this too.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
CALL_LIMIT_BYTES = 64 * MiB  # the working tree + carried paths of one device call
# Kept free in every call: the manifest travels in each, and the tree may grow a little between
# building the parts and using them.
CALL_MARGIN_BYTES = MiB
MANIFEST = "carry.json"
# x86 branch conversion before LZMA2: 2% smaller for the shared libraries, harmless for the rest.
XZ_FILTERS = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9}]


class BundleError(RuntimeError):
    """A part is missing or damaged, or a plan cannot fit (the message says which)."""


@dataclass(frozen=True)
class Archive:
    name: str  # e.g. "ort": parts are <name>.tar.xz.part-NN
    sha256: str
    size: int
    parts: tuple[tuple[str, int], ...]  # (file name, bytes), in order


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def pack(source: Path, archive: Path) -> None:
    """source/ (regular files and folders only) -> archive (.tar.xz), members sorted, owners and times zeroed,
    so that the same tree always gives the same bytes."""
    paths = sorted(p for p in source.rglob("*"))
    for path in paths:
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise BundleError(f"{path}: only regular files and folders are packed")
    with lzma.open(archive, "wb", format=lzma.FORMAT_XZ, filters=XZ_FILTERS) as xz:
        with tarfile.open(fileobj=xz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in paths:
                tar.add(path, arcname=str(path.relative_to(source)), recursive=False, filter=_normalised)


def sha256_of(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(MiB):
                digest.update(chunk)
    return digest.hexdigest()


def split(archive: Path, part_bytes: int) -> Archive:
    """Cut archive into <archive>.part-00, -01, ... of at most part_bytes each; the archive itself is removed."""
    if part_bytes <= 0:
        raise BundleError(f"no room for a part: {part_bytes} bytes per call")
    name = archive.name.removesuffix(".tar.xz")
    digest, size = sha256_of([archive]), archive.stat().st_size
    parts = []
    with open(archive, "rb") as f:
        for i in range(max(1, -(-size // part_bytes))):
            part = archive.with_name(f"{archive.name}.part-{i:02d}")
            with open(part, "wb") as out:
                out.write(f.read(part_bytes))
            parts.append((part.name, part.stat().st_size))
    archive.unlink()
    return Archive(name, digest, size, tuple(parts))


def tree_bytes(files: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in files if p.is_file())


def plan_calls(archives: list[Archive], tree: int, manifest_bytes: int = 64 * 1024) -> list[list[str]]:
    """Part file names per device call, in order: each call fills up to its room, the last runs the benchmark.

    Room per call = the limit - the working tree - the manifest - a margin. Parts go in archive order,
    so an early archive (onnxruntime) is complete, and can be unpacked, as soon as possible.
    """
    room = CALL_LIMIT_BYTES - tree - manifest_bytes - CALL_MARGIN_BYTES
    calls: list[list[str]] = [[]]
    used = 0
    for archive in archives:
        for part, size in archive.parts:
            if size > room:
                raise BundleError(f"{part} has {size} bytes, a call has room for {room}")
            if used + size > room:
                calls.append([])
                used = 0
            calls[-1].append(part)
            used += size
    return calls


def write_manifest(folder: Path, archives: list[Archive], calls: list[list[str]], tree: int) -> Path:
    path = folder / MANIFEST
    manifest = {
        "archives": [
            {"name": a.name, "sha256": a.sha256, "bytes": a.size, "parts": [list(p) for p in a.parts]} for a in archives
        ],
        "calls": calls,
        "tree_bytes": tree,
        "call_limit_bytes": CALL_LIMIT_BYTES,
    }
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(folder: Path) -> list[Archive]:
    data = json.loads((folder / MANIFEST).read_text())
    return [
        Archive(a["name"], a["sha256"], a["bytes"], tuple((p, int(n)) for p, n in a["parts"])) for a in data["archives"]
    ]


def stash(carried: Path, store: Path) -> list[str]:
    """Move the parts (and the manifest) this call carried from the working-tree copy into store/."""
    store.mkdir(parents=True, exist_ok=True)
    moved = []
    if not carried.is_dir():
        return moved
    for path in sorted(carried.iterdir()):
        if path.name == MANIFEST or ".part-" in path.name:
            shutil.move(str(path), store / path.name)
            moved.append(path.name)
    return moved


class _Concatenated:
    """The parts read as one file (tarfile's stream mode reads it front to back)."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = iter(paths)
        self._file = None

    def read(self, n: int = -1) -> bytes:
        chunks = []
        while n != 0:
            if self._file is None:
                path = next(self._paths, None)
                if path is None:
                    break
                self._file = open(path, "rb")  # noqa: SIM115 - closed when exhausted
            chunk = self._file.read(n)
            if not chunk:
                self._file.close()
                self._file = None
                continue
            chunks.append(chunk)
            n = n - len(chunk) if n > 0 else n
        return b"".join(chunks)


def missing_parts(archive: Archive, store: Path) -> list[str]:
    return [
        name for name, size in archive.parts if not (store / name).is_file() or (store / name).stat().st_size != size
    ]


def unpack(archive: Archive, store: Path, dest: Path) -> None:
    """Check the parts' SHA-256, then extract them as the folder dest (members may not leave it: tarfile's
    data filter); an earlier dest is replaced."""
    missing = missing_parts(archive, store)
    if missing:
        raise BundleError(f"{archive.name}: parts missing or of the wrong size: {', '.join(missing)}")
    parts = [store / name for name, _ in archive.parts]
    digest = sha256_of(parts)
    if digest != archive.sha256:
        raise BundleError(f"{archive.name}: SHA-256 {digest} of the parts, the manifest says {archive.sha256}")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with lzma.open(_Concatenated(parts), "rb") as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
            tar.extractall(partial, filter="data")
    except (tarfile.TarError, lzma.LZMAError, EOFError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BundleError(f"{archive.name}: cannot unpack: {exc}") from exc
    shutil.rmtree(dest, ignore_errors=True)  # a rerun replaces what an earlier one unpacked
    os.replace(partial, dest)
