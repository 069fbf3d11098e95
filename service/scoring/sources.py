"""Where a scoring job's images come from: zip/tar archives and manifests of paths, checked for safety.

Archives are untrusted input. Every member name is checked before anything is written:
absolute names, ``..`` components, backslashes, NUL bytes, names that are not UTF-8 or too long
for the file system, symlinks, hard links, devices, duplicate names and a name used as both a
file and a folder refuse the whole archive (``UnsafeArchive``, 422). Sizes are never trusted from
headers: bytes are counted while they are copied, and extraction stops at the first limit
crossed (``ArchiveLimits``: member count, bytes per member, total bytes, expansion ratio over
the archive's own size: the zip-bomb guard) with ``PayloadTooLarge`` (413).

Manifests (one path per line: plain, or a JSON string or ``{"path": ...}`` object) name files
under the operator's ``job_root``. A path with a ``..`` component, an absolute path outside the
root, or a path whose symlinks resolve outside the root is refused with ``Forbidden`` (403). When
the file is read it is opened beneath the root one component at a time
(service/scoring/safe_open.py), so a symlink swapped in after submission, or during the read, is
still refused, and only regular files are read.
"""

from __future__ import annotations

import errno
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
from typing import IO

from service.core.errors import BadRequest, PayloadTooLarge, ServiceError, StorageFull, is_storage_full
from service.core.image_files import is_image_name
from service.scoring.safe_open import Forbidden, open_regular, open_under_root, read_descriptor

_COPY_CHUNK = 1 << 20
# Linux's NAME_MAX and a PATH_MAX with room for the job folder the names are extracted under.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 3072
_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST})
_ZIP_MAX_ENTRY_BYTES = 1024  # what one entry may take on average (name + extras) before we refuse
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
    UnicodeDecodeError,  # a zip member name flagged UTF-8 that is not
)


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
        max_entries: most entries of any kind (folders and skipped files too): each costs parsing
            time, an inode and a database row, whatever its size (100k empty entries fit in 760 KiB).
    """

    max_members: int = 1_000_000
    max_member_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 16 * 1024**3
    max_ratio: float = 100.0
    max_entries: int = 50_000


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
    try:
        encoded = clean.encode("utf-8")
    except UnicodeEncodeError:  # tarfile keeps undecodable bytes as surrogates
        raise UnsafeArchive(f"archive entry {name!r}: the name is not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafeArchive(f"archive entry {_short(name)}: path of {len(encoded)} bytes, over {MAX_PATH_BYTES}")
    long_part = next((part for part in PurePosixPath(clean).parts if len(part.encode()) > MAX_NAME_BYTES), None)
    if long_part is not None:
        raise UnsafeArchive(
            f"archive entry {_short(name)}: a name of {len(long_part.encode())} bytes, over {MAX_NAME_BYTES}"
        )
    return clean


def _short(name: str) -> str:
    return repr(name) if len(name) <= 120 else f"{name[:60]!r}...{name[-40:]!r} ({len(name)} characters)"


@dataclass
class _Budget:
    limits: ArchiveLimits
    archive_bytes: int
    members: int = 0
    entries: int = 0
    total: int = 0

    def admit_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise PayloadTooLarge(f"archive has more than {self.limits.max_entries} entries (max_archive_entries)")

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


_Opener = Callable[[], IO[bytes]]


def _zip_directory_size(path: Path) -> tuple[int, int]:
    """(entries, central directory bytes) from a zip's end records, read before zipfile parses it all."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_at = max(0, size - (22 + 65535 + 20))
        f.seek(tail_at)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            raise zipfile.BadZipFile("no end of central directory record")
        entries = int.from_bytes(tail[at + 10 : at + 12], "little")
        directory_bytes = int.from_bytes(tail[at + 12 : at + 16], "little")
        locator = tail.rfind(b"PK\x06\x07", 0, at)
        if locator >= 0 and (entries == 0xFFFF or directory_bytes == 0xFFFFFFFF):
            f.seek(int.from_bytes(tail[locator + 8 : locator + 16], "little"))
            record = f.read(56)
            if record[:4] != b"PK\x06\x06" or len(record) < 56:
                raise zipfile.BadZipFile("corrupt zip64 end of central directory record")
            entries = int.from_bytes(record[32:40], "little")
            directory_bytes = int.from_bytes(record[40:48], "little")
    return entries, directory_bytes


def _check_zip_directory(path: Path, budget: _Budget) -> None:
    # zipfile reads the whole central directory into memory first: refuse a huge one before it does.
    entries, directory_bytes = _zip_directory_size(path)
    limit = budget.limits.max_entries
    if entries > limit or directory_bytes > max(limit, 1) * _ZIP_MAX_ENTRY_BYTES:
        raise PayloadTooLarge(
            f"archive declares {entries} entries in a {directory_bytes}-byte directory; the limit is "
            f"{limit} entries (max_archive_entries)"
        )


def _members(path: Path, kind: str, budget: _Budget) -> Iterator[tuple[str, bool, _Opener | None]]:
    """(raw name, is a directory, opener of its stream) per entry; links and devices raise UnsafeArchive.

    A stream must be read before the next entry is taken; entries never opened are skipped cheaply.
    Every entry counts against ``max_entries``.
    """
    if kind == "zip":
        _check_zip_directory(path, budget)
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                budget.admit_entry()
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
            budget.admit_entry()
            if member.issym() or member.islnk():
                raise UnsafeArchive(f"archive entry {member.name!r} is a link (to {member.linkname!r})")
            if member.isdir():
                yield member.name, True, None
            elif member.isfile():
                yield member.name, False, partial(_extract, archive, member)
            else:
                raise UnsafeArchive(f"archive entry {member.name!r} is a device, FIFO or other special file")


def _extract(archive: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    stream = archive.extractfile(member)
    if stream is None:  # only for entries that are not regular files, which _members never opens
        raise UnsafeArchive(f"archive entry {member.name!r} is not a regular file")
    return stream


def _image_members(path: Path, kind: str, budget: _Budget) -> Iterator[tuple[str, _Opener]]:
    """(checked name, opener) of every image entry, in archive order, before anything is read.

    Names are checked even for skipped entries (one bad name refuses the whole archive); a name seen
    twice is refused, and so is a name used both as a file and as a folder (``x.png`` and
    ``x.png/y.png``); every image counts against the member budget.
    """
    seen: set[str] = set()
    folders: set[str] = set()
    for raw_name, is_dir, stream in _members(path, kind, budget):
        name = safe_member_name(raw_name, directory=is_dir)
        if is_dir or not is_image_name(name):
            continue
        if name in seen:
            raise UnsafeArchive(f"archive entry {name!r} appears twice")
        parents = [str(parent) for parent in PurePosixPath(name).parents if str(parent) != "."]
        clash = name if name in folders else next((parent for parent in parents if parent in seen), None)
        if clash is not None:
            raise UnsafeArchive(f"archive entry {_short(name)}: {clash!r} is both a file and a folder")
        seen.add(name)
        folders.update(parents)
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
    except OSError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if is_storage_full(exc):
            raise StorageFull(
                "the disk is full: the archive could not be extracted; retry later", retry_after_s=30
            ) from None
        if exc.errno in _NAME_ERRNOS:  # whatever the name checks missed: the archive's fault, not ours
            raise UnsafeArchive(f"archive entry could not be written ({exc.strerror or exc})") from None
        raise
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return sorted(names)


_PATH_MAX = 4096  # Linux's longest path: a longer manifest line cannot name a file


def manifest_paths(lines: Iterable[str | bytes]) -> list[str]:
    """One path per line, blank lines skipped: a plain path (``a/b.jpg``), or JSON lines, each a
    string (``"a/b.jpg"``) or an object with "path". A line that starts with ``"`` or ``{`` is JSON."""
    paths = []
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8", errors="strict") if isinstance(line, bytes) else line
        except UnicodeDecodeError as exc:
            raise BadRequest(f"manifest line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not text.strip():
            continue
        if not text.lstrip().startswith(('"', "{", "[")):
            if len(text.strip().encode()) > _PATH_MAX:
                raise BadRequest(f"manifest line {number}: a path of {len(text.strip())} characters, over {_PATH_MAX}")
            paths.append(text.strip())  # a plain path; surrounding white space is never part of a name here
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            raise BadRequest(f"manifest line {number}: JSON nested too deeply") from None
        except ValueError as exc:  # bad syntax, or an integer past Python's 4300-digit conversion limit
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


def read_limited(path: Path, max_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """A regular file's bytes, refusing larger than ``max_bytes`` (checked while reading), FIFOs and devices."""
    return read_descriptor(open_regular(path, follow_symlinks=follow_symlinks), path.name, max_bytes)


def read_under_root(path: str, root: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` under ``root``, opened without ever leaving the root (safe_open)."""
    return read_descriptor(open_under_root(path, root), PurePosixPath(path).name, max_bytes)
