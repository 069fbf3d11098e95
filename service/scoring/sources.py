"""Where a scoring job's images come from: zip/tar archives and manifests of paths, checked for safety.

Archives are untrusted input. Every member name is checked before anything is written:
absolute names, ``..`` components, backslashes, NUL bytes, symlinks, hard links, devices and
duplicate names refuse the whole archive (``UnsafeArchive``, 422). Sizes are never trusted from
headers: bytes are counted while they are copied, and extraction stops at the first limit
crossed (``ArchiveLimits``: member count, bytes per member, total bytes, expansion ratio over
the archive's own size: the zip-bomb guard) with ``PayloadTooLarge`` (413).

Manifests (one path per line: plain, or a JSON string or ``{"path": ...}`` object) name files
under the operator's ``job_root``. A path with a ``..`` component, an absolute path outside the
root, or a path whose symlinks resolve outside the root is refused with ``Forbidden`` (403); the
check is repeated when the file is read, so a symlink swapped in after submission is still refused.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.core.errors import BadRequest, PayloadTooLarge, ServiceError
from service.core.image_files import is_image_name

_COPY_CHUNK = 1 << 20
# What a damaged or unsupported archive raises while it is read: a 400, never a 500. zlib/lzma
# errors come from garbage in a member's compressed data (zipfile passes them through), and
# NotImplementedError from zip members with a compression method or encryption zipfile lacks.
_CORRUPT_ARCHIVE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
)


class Forbidden(ServiceError):
    """A manifest path the operator did not allow (outside VITSERVE_JOB_ROOT, ``..``, symlink out)."""

    status_code = 403
    code = "forbidden"


class UnsafeArchive(ServiceError):
    """An archive with entries that could write outside its folder (traversal, links, devices)."""

    status_code = 422
    code = "unsafe_archive"


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what one archive may expand to.

    Args:
        max_members: most image files in one archive.
        max_member_bytes: largest single image, uncompressed.
        max_total_bytes: most bytes all extracted images may take together.
        max_ratio: most uncompressed bytes per archive byte (zip bombs compress ~1000:1; photos ~1:1).
    """

    max_members: int = 1_000_000
    max_member_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 16 * 1024**3
    max_ratio: float = 100.0


def archive_kind(path: Path) -> str | None:
    """ "zip", "tar" (plain, gz, bz2 or xz) or None, from the file's content, not its name."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError, EOFError):
        pass
    return None


def safe_member_name(name: str, *, directory: bool = False) -> str:
    """An archive member name as a clean relative POSIX path, or UnsafeArchive.

    A directory entry may name the archive's own root (``./``, as ``tar -C dir .`` writes): "" then.
    """
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeArchive(f"archive entry {name!r}: empty name, NUL byte or backslash")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchive(f"archive entry {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchive(f"archive entry {name!r} points outside the archive ('..')")
    clean = str(PurePosixPath(*[p for p in path.parts if p not in ("", ".")])) if path.parts else ""
    if clean in ("", "."):
        if directory:
            return ""
        raise UnsafeArchive(f"archive entry {name!r} has no file name")
    return clean


@dataclass
class _Budget:
    limits: ArchiveLimits
    archive_bytes: int
    members: int = 0
    total: int = 0

    def admit_member(self, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise PayloadTooLarge(f"archive has more than {self.limits.max_members} images (max_members)")

    def count(self, name: str, member_bytes: int, added: int) -> None:
        self.total += added
        if member_bytes > self.limits.max_member_bytes:
            raise PayloadTooLarge(f"archive entry {name!r} expands past {self.limits.max_member_bytes} bytes")
        if self.total > self.limits.max_total_bytes:
            raise PayloadTooLarge(f"archive expands past {self.limits.max_total_bytes} bytes in total")
        if self.total > self.limits.max_ratio * max(self.archive_bytes, 1 << 20):
            # The 1 MiB floor keeps tiny archives of incompressible photos clear of the ratio check.
            raise PayloadTooLarge(
                f"archive expands more than {self.limits.max_ratio:g} times its size (a decompression bomb?)"
            )


_Opener = Callable[[], BinaryIO]


def _members(path: Path, kind: str) -> Iterator[tuple[str, bool, _Opener | None]]:
    """(raw name, is a directory, opener of its stream) per entry; links and devices raise UnsafeArchive.

    A stream must be read before the next entry is taken; entries never opened are skipped cheaply.
    """
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise UnsafeArchive(f"archive entry {info.filename!r} is a symbolic link")
                if info.is_dir():
                    yield info.filename, True, None
                    continue
                if info.flag_bits & 0x1:  # zipfile would raise a bare RuntimeError (a 500) asking for a password
                    raise BadRequest(f"archive entry {info.filename!r} is encrypted; send an unencrypted archive")
                yield info.filename, False, partial(archive.open, info)
        return
    # Streaming mode ("r|*"): one pass, never seeks back, works for .tar.gz of any size.
    with tarfile.open(path, "r|*") as archive:
        for member in archive:
            if member.issym() or member.islnk():
                raise UnsafeArchive(f"archive entry {member.name!r} is a link (to {member.linkname!r})")
            if member.isdir():
                yield member.name, True, None
            elif member.isfile():
                yield member.name, False, partial(archive.extractfile, member)
            else:
                raise UnsafeArchive(f"archive entry {member.name!r} is a device, FIFO or other special file")


def _image_members(path: Path, kind: str, budget: _Budget) -> Iterator[tuple[str, _Opener]]:
    """(checked name, opener) of every image entry, in archive order, before anything is read.

    Names are checked even for skipped entries (one bad name refuses the whole archive); a name seen
    twice is refused; every image counts against the member budget.
    """
    seen: set[str] = set()
    for raw_name, is_dir, stream in _members(path, kind):
        name = safe_member_name(raw_name, directory=is_dir)
        if is_dir or not is_image_name(name):
            continue
        if name in seen:
            raise UnsafeArchive(f"archive entry {name!r} appears twice")
        seen.add(name)
        budget.admit_member(name)
        assert stream is not None
        yield name, stream


def list_archive(path: Path, limits: ArchiveLimits) -> list[str]:
    """The image names of a zip or tar, in archive order, every name check applied, no image read."""
    kind = archive_kind(path)
    if kind is None:
        raise BadRequest(f"{path.name}: not a zip or tar archive")
    budget = _Budget(limits, path.stat().st_size)
    try:
        return [name for name, _ in _image_members(path, kind, budget)]
    except _CORRUPT_ARCHIVE as exc:
        raise BadRequest(f"{path.name}: corrupt archive: {exc}") from None


def iter_archive(path: Path, limits: ArchiveLimits) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every image in a zip or tar, in archive order, all checks applied."""
    kind = archive_kind(path)
    if kind is None:
        raise BadRequest(f"{path.name}: not a zip or tar archive")
    budget = _Budget(limits, path.stat().st_size)
    try:
        for name, stream in _image_members(path, kind, budget):
            with stream() as opened:
                data = opened.read(limits.max_member_bytes + 1)
            budget.count(name, len(data), len(data))
            yield name, data
    except _CORRUPT_ARCHIVE as exc:
        raise BadRequest(f"{path.name}: corrupt archive: {exc}") from None


def extract_archive(path: Path, dest: Path, limits: ArchiveLimits) -> list[str]:
    """Extract the images of a zip or tar into ``dest`` (created empty); returns their names, sorted.

    Nothing outside ``dest`` is ever written: names are checked first and files are created with
    O_EXCL | O_NOFOLLOW. On any refusal ``dest`` is removed again.
    """
    kind = archive_kind(path)
    if kind is None:
        raise BadRequest("the upload is not a zip or tar archive (plain, .gz, .bz2 or .xz)")
    dest.mkdir(parents=True, exist_ok=False)
    budget = _Budget(limits, path.stat().st_size)
    names: list[str] = []
    try:
        for name, stream in _image_members(path, kind, budget):
            target = dest.joinpath(*PurePosixPath(name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:  # O_EXCL | O_NOFOLLOW: never overwrite, never write through a link, whatever the checks missed
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                raise UnsafeArchive(f"archive entry {name!r} appears twice") from None
            written = 0
            with os.fdopen(fd, "wb") as out, stream() as opened:
                while chunk := opened.read(_COPY_CHUNK):
                    written += len(chunk)
                    budget.count(name, written, len(chunk))
                    out.write(chunk)
            names.append(name)
    except _CORRUPT_ARCHIVE as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise BadRequest(f"corrupt archive: {exc}") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return sorted(names)


def manifest_paths(lines: Iterable[str | bytes]) -> list[str]:
    """One path per line, blank lines skipped: a plain path (``a/b.jpg``), or JSON lines, each a
    string (``"a/b.jpg"``) or an object with "path". A line that starts with ``"`` or ``{`` is JSON."""
    paths = []
    for number, line in enumerate(lines, start=1):
        text = line.decode("utf-8", errors="strict") if isinstance(line, bytes) else line
        if not text.strip():
            continue
        if not text.lstrip().startswith(('"', "{")):
            paths.append(text.strip())  # a plain path; surrounding white space is never part of a name here
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise BadRequest(
                f"manifest line {number}: starts like JSON but is not ({exc}); give a plain path or a JSON "
                'string / {"path": "..."} per line'
            ) from None
        if isinstance(value, dict):
            value = value.get("path")
        if not isinstance(value, str) or not value:
            raise BadRequest(f'manifest line {number}: expected a JSON string or {{"path": "..."}}, got {text[:80]!r}')
        paths.append(value)
    return paths


def resolve_under_root(path: str, root: Path) -> Path:
    """The real location of ``path`` (relative to ``root``, or absolute inside it), or Forbidden."""
    if "\x00" in path:
        raise Forbidden(f"path {path!r} contains a NUL byte")
    pure = PurePosixPath(path)
    if ".." in pure.parts:
        raise Forbidden(f"path {path!r}: '..' is not allowed in manifest paths")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(pure if pure.is_absolute() else real_root / pure))
    if real != real_root and real_root not in real.parents:
        why = "is outside" if pure.is_absolute() else "resolves (through a symlink) outside"
        raise Forbidden(f"path {path!r} {why} the job root; only files under VITSERVE_JOB_ROOT may be scored")
    return real


def read_limited(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, refusing files larger than ``max_bytes`` (checked while reading)."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{path.name} is larger than {max_bytes} bytes")
    return data
