"""Opening client-named files beneath the job root (service/scoring/safe_open.py), in-process.

The race test swaps a directory of the root for a symlink out of it, in another process, as fast
as it can, while paths through it are read; the check-then-open that the service used before is
run in the same loop as a control (it must leak at least once, or the test proves nothing).
RELIABILITY_SWAP_READS sets the number of reads (CI 3000; `make fuzz` more).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from reliability_lib import scale

from service.scoring.safe_open import Forbidden, NotRegularFile, open_under_root
from service.scoring.sources import read_under_root, resolve_under_root

READS = scale("RELIABILITY_SWAP_READS", 3000)
INSIDE, OUTSIDE = b"inside the root", b"OUTSIDE THE ROOT"

# Flips root/dir between the real directory and a symlink to outside/, until killed: an atomic
# renameat2(RENAME_EXCHANGE) of root/dir and root/alt (two renames, with a gap, where it is missing).
SWAPPER = """
import ctypes, os, sys
root, outside = sys.argv[1], sys.argv[2]
d, alt = os.path.join(root, "dir"), os.path.join(root, "alt")
os.symlink(outside, alt)
libc = ctypes.CDLL(None, use_errno=True)
exchange = getattr(libc, "renameat2", None)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
while True:
    if exchange is not None and exchange(AT_FDCWD, d.encode(), AT_FDCWD, alt.encode(), RENAME_EXCHANGE) == 0:
        continue
    os.rename(d, d + ".tmp"); os.rename(alt, d); os.rename(d + ".tmp", alt)
"""


@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    outside.mkdir()
    (root / "dir" / "a.jpg").write_bytes(INSIDE)
    (outside / "a.jpg").write_bytes(OUTSIDE)
    (root / "ok.jpg").write_bytes(INSIDE)
    return root, outside


def _check_then_open(path: str, root: Path) -> bytes:
    """What the service did before: resolve, check the resolved path, then open the path again."""
    resolve_under_root(path, root)
    with open(root / path, "rb") as f:
        return f.read()


def test_symlink_swap_race_never_reads_outside_the_root(tree):
    root, outside = tree
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(root), str(outside)])
    try:
        outcomes: dict[str, int] = {}
        control_leaks = 0
        deadline = time.monotonic() + 120
        reads = 0
        while reads < READS or not control_leaks:
            assert time.monotonic() < deadline, "the swapper never raced the control: the test proves nothing"
            reads += 1
            try:
                data = read_under_root("dir/a.jpg", root, 1 << 20)
                outcome = "inside" if data == INSIDE else "LEAKED"
            except Forbidden:
                outcome = "forbidden"
            except FileNotFoundError:
                outcome = "missing"  # between the two renames of a flip
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            try:
                control_leaks += _check_then_open("dir/a.jpg", root) == OUTSIDE
            except (Forbidden, OSError):
                pass
    finally:
        swapper.kill()
        swapper.wait()
    print(f"\n{reads} reads during swaps: {outcomes}; the check-then-open control leaked {control_leaks} times")
    assert "LEAKED" not in outcomes
    assert outcomes.get("inside", 0) > 0 and outcomes.get("forbidden", 0) > 0  # both states were seen


def test_symlinks_that_stay_inside_are_followed_and_others_refused(tree):
    root, outside = tree
    (root / "sub").mkdir()
    (root / "sub" / "rel.jpg").symlink_to("../ok.jpg")  # relative, stays inside
    (root / "abs.jpg").symlink_to(root / "dir" / "a.jpg")  # absolute, inside
    (root / "chain.jpg").symlink_to("sub/rel.jpg")  # a link to a link
    (root / "out.jpg").symlink_to(outside / "a.jpg")
    (root / "up.jpg").symlink_to("../outside/a.jpg")
    (root / "sub" / "upup.jpg").symlink_to("../../outside/a.jpg")
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "outdir").symlink_to(outside, target_is_directory=True)
    for name in ("sub/rel.jpg", "abs.jpg", "chain.jpg", str(root / "chain.jpg"), "./ok.jpg", "sub/../ok.jpg"):
        if ".." in Path(name).parts:
            with pytest.raises(Forbidden, match=r"'\.\.'"):
                open_under_root(name, root)
            continue
        fd = open_under_root(name, root)
        with os.fdopen(fd, "rb") as f:
            assert f.read() == INSIDE, name
    for name in ("out.jpg", "up.jpg", "sub/upup.jpg", "outdir/a.jpg", str(outside / "a.jpg"), "/etc/passwd"):
        with pytest.raises(Forbidden):
            open_under_root(name, root)
    with pytest.raises(Forbidden, match="symbolic links"):
        open_under_root("loop.jpg", root)


def test_only_regular_files_are_read_and_nothing_blocks(tree):
    root, _ = tree
    os.mkfifo(root / "pipe.jpg")
    (root / "folder.jpg").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock.jpg"))
    specials = ["pipe.jpg", "folder.jpg", "sock.jpg"]
    if os.geteuid() == 0:
        os.mknod(root / "zero.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: read for ever
        specials.append("zero.jpg")
    results: dict[str, str] = {}

    def read_all() -> None:
        for name in specials:
            try:
                read_under_root(name, root, 64 << 20)
                results[name] = "read"
            except NotRegularFile as exc:
                results[name] = exc.message

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(10)
    listener.close()
    assert not reader.is_alive(), "reading a special file blocked"
    assert set(results) == set(specials)
    assert all("only regular files are read" in why for why in results.values()), results
    assert "FIFO" in results["pipe.jpg"] and "directory" in results["folder.jpg"] and "socket" in results["sock.jpg"]
    if "zero.jpg" in results:
        assert "device" in results["zero.jpg"]
