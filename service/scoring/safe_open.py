"""Opening a client-named file under a root so that what is read is what was checked.

Checking a path (realpath, then "is it under the root?") and then opening it leaves a window in
which a directory on the path can be swapped for a symlink out of the root. Here the path is
walked one component at a time from a descriptor of the root, each component opened with
O_PATH | O_NOFOLLOW relative to the descriptor of the one before: a symlink is seen as a
symlink (never followed by the kernel), its target is read from the link's own descriptor and
walked by the same rules (an absolute target must lie under the root, ``..`` may not climb above
it), so a swap at any moment either is seen or does not matter: the directories already opened
stay the ones that were checked. The last component is opened for reading only if it is a
regular file (FIFOs, devices, sockets and directories are refused without being opened for
reading, so nothing blocks), with O_NONBLOCK and O_NOFOLLOW, and its identity compared with the
O_PATH descriptor that was checked. /proc/self/fd then confirms where the descriptor lives.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from service.core.errors import PayloadTooLarge, ServiceError

_MAX_SYMLINKS = 40  # as the kernel's own limit (ELOOP)
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


class Forbidden(ServiceError):
    """A manifest path the operator did not allow (outside VITSERVE_JOB_ROOT, ``..``, symlink out)."""

    status_code = 403
    code = "forbidden"


class NotRegularFile(ServiceError):
    """A path that names a FIFO, a device, a socket or a directory: never read."""

    status_code = 422
    code = "not_a_regular_file"


def _outside(path: str) -> Forbidden:
    return Forbidden(
        f"path {path!r} resolves (through a symlink) outside the job root; only files under VITSERVE_JOB_ROOT "
        "may be scored"
    )


def _relative_to_root(path: PurePosixPath, roots: tuple[str, ...]) -> PurePosixPath | None:
    for root in roots:
        try:
            return path.relative_to(root)
        except ValueError:
            continue
    return None


def _not_regular(path: str, mode: int) -> NotRegularFile:
    kind = (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return NotRegularFile(f"{path!r} is {kind}; only regular files are read")


def open_under_root(path: str, root: Path) -> int:
    """A read-only descriptor of the regular file ``path`` (relative to ``root``, or absolute inside it).

    Raises Forbidden (``..`` in the path, absolute outside the root, a symlink leading out),
    NotRegularFile, or OSError (missing file, a file where a directory should be, ...).
    The caller closes the descriptor.
    """
    if "\x00" in path:
        raise Forbidden(f"path {path!r} contains a NUL byte")
    pure = PurePosixPath(path)
    if ".." in pure.parts:
        raise Forbidden(f"path {path!r}: '..' is not allowed in manifest paths")
    real_root = os.path.realpath(root)
    roots = (real_root, os.path.abspath(root))
    if pure.is_absolute():
        relative = _relative_to_root(pure, roots)
        if relative is None:
            raise Forbidden(f"path {path!r} is outside the job root; only files under VITSERVE_JOB_ROOT may be scored")
        pure = relative
    root_fd = os.open(real_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack = [root_fd]  # descriptors of the directories walked, from the root down
    pending = [p for p in reversed(pure.parts) if p not in ("", ".")]  # a stack: next component last
    symlinks = 0
    try:
        if not pending:
            raise _not_regular(path, stat.S_IFDIR)
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":  # only from a symlink's target: the physical parent, never above the root
                if len(stack) == 1:
                    raise _outside(path)
                os.close(stack.pop())
                continue
            fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            try:
                info = os.fstat(fd)
                if stat.S_ISLNK(info.st_mode):
                    symlinks += 1
                    if symlinks > _MAX_SYMLINKS:
                        raise Forbidden(f"path {path!r}: more than {_MAX_SYMLINKS} symbolic links")
                    target = PurePosixPath(os.readlink("", dir_fd=fd))  # the link this descriptor holds
                    if target.is_absolute():
                        relative = _relative_to_root(target, roots)
                        if relative is None:
                            raise _outside(path)
                        while len(stack) > 1:
                            os.close(stack.pop())
                        target = relative
                    pending.extend(reversed(target.parts))
                    continue
                if pending:
                    if not stat.S_ISDIR(info.st_mode):
                        raise NotADirectoryError(f"{part!r} in {path!r} is not a directory")
                    stack.append(fd)
                    fd = -1
                    continue
                if not stat.S_ISREG(info.st_mode):
                    raise _not_regular(path, info.st_mode)
                opened = os.open(part, _READ_FLAGS, dir_fd=stack[-1])
                now = os.fstat(opened)
                if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(now.st_mode):
                    os.close(opened)
                    raise Forbidden(f"path {path!r} changed while it was opened; not read")
                _confirm_beneath(opened, real_root, path)
                return opened
            finally:
                if fd >= 0:
                    os.close(fd)
        raise _not_regular(path, stat.S_IFDIR)  # the walk ended on a directory (a symlink to one)
    finally:
        for held in stack:
            os.close(held)


def _confirm_beneath(fd: int, real_root: str, path: str) -> None:
    """Where the kernel says the descriptor is: a second, independent check of the walk."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return  # no /proc: the walk above is the guarantee
    if where != real_root and not where.startswith(real_root.rstrip("/") + "/"):
        os.close(fd)
        raise _outside(path)


def open_regular(path: Path, *, follow_symlinks: bool = True) -> int:
    """A read-only descriptor of ``path`` if it is a regular file (checked before it is opened for
    reading, and again on the descriptor; never blocks on a FIFO, never opens a device)."""
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    probe = os.open(path, os.O_PATH | os.O_CLOEXEC | nofollow)
    try:
        info = os.fstat(probe)
    finally:
        os.close(probe)
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(str(path), info.st_mode)
    fd = os.open(path, (_READ_FLAGS & ~os.O_NOFOLLOW) | nofollow)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
        os.close(fd)
        raise NotRegularFile(f"{str(path)!r} changed while it was opened; not read")
    return fd


def read_descriptor(fd: int, name: str, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` from ``fd`` (closed afterwards); PayloadTooLarge past that."""
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{name} is larger than {max_bytes} bytes")
    return data
