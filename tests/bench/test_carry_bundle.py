"""bench/carry/bundle.py: archives that always come out the same, parts that fit the calls, and an unpacking
on the far side that takes only complete, intact parts."""

from __future__ import annotations

import io
import json
import lzma
import os
import tarfile
from pathlib import Path

import pytest

from bench.carry import bundle
from bench.carry.__main__ import main as carry_main


def make_tree(root: Path) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (root / "pkg" / "sub" / "data.bin").write_bytes(os.urandom(300_000))  # incompressible: several parts
    (root / "pkg" / "lib.so").write_bytes(bytes(1_000_000))
    return root


def test_pack_is_deterministic_and_parts_unpack_to_the_same_tree(tmp_path):
    tree = make_tree(tmp_path / "tree")
    bundle.pack(tree, tmp_path / "a.tar.xz")
    os.utime(tree / "pkg" / "__init__.py", (1, 1))  # a newer checkout: other times, same content
    bundle.pack(tree, tmp_path / "b.tar.xz")
    assert (tmp_path / "a.tar.xz").read_bytes() == (tmp_path / "b.tar.xz").read_bytes()

    archive = bundle.split(tmp_path / "a.tar.xz", 100_000)
    assert not (tmp_path / "a.tar.xz").exists()
    assert len(archive.parts) >= 3 and all(size <= 100_000 for _, size in archive.parts)
    assert sum(size for _, size in archive.parts) == archive.size
    bundle.unpack(archive, tmp_path, tmp_path / "out")
    for path in tree.rglob("*"):
        twin = tmp_path / "out" / path.relative_to(tree)
        assert twin.is_dir() if path.is_dir() else twin.read_bytes() == path.read_bytes()


def test_symlinks_are_not_packed(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "link").symlink_to("/etc")
    with pytest.raises(bundle.BundleError, match="only regular files"):
        bundle.pack(tree, tmp_path / "a.tar.xz")


def test_unpack_takes_only_complete_intact_parts(tmp_path):
    bundle.pack(make_tree(tmp_path / "tree"), tmp_path / "a.tar.xz")
    archive = bundle.split(tmp_path / "a.tar.xz", 150_000)
    first, second = (tmp_path / name for name, _ in archive.parts[:2])
    second_bytes = second.read_bytes()
    second.unlink()
    with pytest.raises(bundle.BundleError, match=f"missing or of the wrong size: {second.name}"):
        bundle.unpack(archive, tmp_path, tmp_path / "out")
    second.write_bytes(second_bytes[:-1])
    with pytest.raises(bundle.BundleError, match="wrong size"):
        bundle.unpack(archive, tmp_path, tmp_path / "out")
    damaged = bytearray(second_bytes)
    damaged[100] ^= 0xFF
    second.write_bytes(bytes(damaged))
    with pytest.raises(bundle.BundleError, match="SHA-256"):
        bundle.unpack(archive, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    second.write_bytes(second_bytes)
    bundle.unpack(archive, tmp_path, tmp_path / "out")
    assert (tmp_path / "out" / "pkg" / "__init__.py").read_text() == "VALUE = 1\n"
    assert first.exists()


def test_a_member_that_would_leave_the_folder_is_refused(tmp_path):
    raw = io.BytesIO()
    with lzma.open(raw, "wb") as xz, tarfile.open(fileobj=xz, mode="w|") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    (tmp_path / "evil.tar.xz").write_bytes(raw.getvalue())
    archive = bundle.split(tmp_path / "evil.tar.xz", 1 << 20)
    with pytest.raises(bundle.BundleError, match="cannot unpack"):
        bundle.unpack(archive, tmp_path, tmp_path / "store" / "out")
    assert not (tmp_path / "store" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_calls_fill_up_to_their_room_in_order():
    mib = bundle.MiB
    ort = bundle.Archive("ort", "x", 70 * mib, (("ort.tar.xz.part-00", 50 * mib), ("ort.tar.xz.part-01", 20 * mib)))
    service = bundle.Archive("service", "y", 4 * mib, (("service.tar.xz.part-00", 4 * mib),))
    tree = 6 * mib
    calls = bundle.plan_calls([ort, service], tree)
    assert calls == [["ort.tar.xz.part-00"], ["ort.tar.xz.part-01", "service.tar.xz.part-00"]]
    sizes = dict(ort.parts + service.parts)
    for call in calls:
        assert tree + sum(sizes[p] for p in call) + 64 * 1024 <= bundle.CALL_LIMIT_BYTES
    too_big = bundle.Archive("big", "z", 60 * mib, (("big.tar.xz.part-00", 60 * mib),))
    with pytest.raises(bundle.BundleError, match="room"):
        bundle.plan_calls([too_big], tree)


def test_build_stash_and_unpack_as_the_calls_do(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    small = tmp_path / "small"
    (small / "site").mkdir(parents=True)
    (small / "site" / "mod.py").write_text("X = 2\n")
    out = tmp_path / "wheelhouse"
    # A tree that leaves ~200 kB per call: the big archive needs several calls, the small one rides along.
    tree_bytes = bundle.CALL_LIMIT_BYTES - bundle.CALL_MARGIN_BYTES - 64 * 1024 - 200_000
    assert carry_main(["build", str(out), "--tree-bytes", str(tree_bytes), f"big={tree}", f"small={small}"]) == 0
    manifest = json.loads((out / "carry.json").read_text())
    calls = manifest["calls"]
    assert len(calls) >= 2 and calls[-1][-1] == "small.tar.xz.part-00"

    store, root = tmp_path / "machine-tmp" / "store", tmp_path / "machine-tmp" / "carried"
    for i, call in enumerate(calls):
        copy = tmp_path / f"call{i}" / ".wheelhouse"  # what one call's working-tree copy holds
        copy.mkdir(parents=True)
        for name in ["carry.json", *call]:
            (copy / name).write_bytes((out / name).read_bytes())
        assert carry_main(["stash", str(copy), str(store)]) == 0
        assert not any(copy.iterdir())
        assert carry_main(["unpack", str(store), str(root)]) == 0
        said = capsys.readouterr().out
        if i < len(calls) - 1:
            assert "big: waiting for" in said or "big: unpacked" in said
    assert (root / "big" / "pkg" / "lib.so").read_bytes() == bytes(1_000_000)
    assert (root / "small" / "site" / "mod.py").read_text() == "X = 2\n"
    assert not list(store.glob("*.part-*"))  # unpacked parts are deleted
    assert carry_main(["unpack", str(store), str(root)]) == 0
    assert "big: ready" in capsys.readouterr().out
