"""Job inputs: archives are extracted only when every entry is safe; manifests stay inside the job root."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from service.core.errors import BadRequest, PayloadTooLarge
from service.scoring.sources import (
    ArchiveLimits,
    Forbidden,
    UnsafeArchive,
    extract_archive,
    iter_archive,
    manifest_paths,
    resolve_under_root,
)

JPEG = b"\xff\xd8\xff\xe0 not decoded here"


def make_zip(path: Path, entries: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def make_tar(
    path: Path, entries: dict[str, bytes], *, links: dict[str, tuple[bytes, str]] | None = None, mode: str = "w:gz"
) -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            archive.addfile(info)
    return path


def test_zip_and_tar_images_are_extracted_and_other_files_skipped(tmp_path):
    entries = {
        "a/one.jpg": JPEG,
        "a/b/two.PNG": b"png",
        "notes.txt": b"skip",
        "__MACOSX/a/._one.jpg": b"x",
        ".hidden.jpg": b"x",
    }
    for archive in (make_zip(tmp_path / "in.zip", entries), make_tar(tmp_path / "in.tar.gz", entries)):
        dest = tmp_path / f"out-{archive.name}"
        assert extract_archive(archive, dest, ArchiveLimits()) == ["a/b/two.PNG", "a/one.jpg"]
        assert (dest / "a" / "one.jpg").read_bytes() == JPEG
        assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["one.jpg", "two.PNG"]


@pytest.mark.parametrize("name", ["../evil.jpg", "a/../../evil.jpg", "/etc/evil.jpg", "C:/evil.jpg", "a\\..\\evil.jpg"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_traversal_entries_refuse_the_whole_archive(tmp_path, name, kind):
    entries = {"fine.jpg": JPEG, name: JPEG}
    archive = make_zip(tmp_path / "bad.zip", entries) if kind == "zip" else make_tar(tmp_path / "bad.tar", entries)
    dest = tmp_path / "jobs" / "out"
    with pytest.raises(UnsafeArchive):
        extract_archive(archive, dest, ArchiveLimits())
    assert not dest.exists()
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "jobs" / "evil.jpg").exists()


def test_links_and_devices_are_refused(tmp_path):
    cases = [
        make_zip(tmp_path / "sym.zip", {"a.jpg": JPEG}, symlinks={"b.jpg": "/etc/passwd"}),
        make_tar(tmp_path / "sym.tar", {"a.jpg": JPEG}, links={"b.jpg": (tarfile.SYMTYPE, "/etc/passwd")}),
        make_tar(tmp_path / "hard.tar", {"a.jpg": JPEG}, links={"b.jpg": (tarfile.LNKTYPE, "/etc/passwd")}),
        make_tar(tmp_path / "dev.tar", {"a.jpg": JPEG}, links={"b.jpg": (tarfile.CHRTYPE, "")}),
    ]
    for archive in cases:
        with pytest.raises(UnsafeArchive):
            extract_archive(archive, tmp_path / f"out-{archive.name}", ArchiveLimits())


def test_duplicate_names_are_refused(tmp_path):
    archive = make_tar(tmp_path / "dup.tar", {"a.jpg": JPEG}, mode="w")
    with tarfile.open(archive, "a") as tar:  # the same name again, e.g. to overwrite an extracted file
        info = tarfile.TarInfo("./a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"xyz"))
    with pytest.raises(UnsafeArchive, match="twice"):
        extract_archive(archive, tmp_path / "out", ArchiveLimits())


def test_zip_bomb_stops_at_the_ratio_while_inflating(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {f"z{i}.png": bytes(4 * 1024 * 1024) for i in range(4)})
    assert archive.stat().st_size < 200_000  # 16 MiB of zeros compress ~1000:1
    with pytest.raises(PayloadTooLarge, match="times its size"):
        extract_archive(archive, tmp_path / "out", ArchiveLimits(max_ratio=10))
    assert not (tmp_path / "out").exists()


def test_member_count_and_size_limits(tmp_path):
    many = make_zip(tmp_path / "many.zip", {f"{i}.jpg": JPEG for i in range(5)})
    with pytest.raises(PayloadTooLarge, match="more than 3"):
        extract_archive(many, tmp_path / "o1", ArchiveLimits(max_members=3))
    big = make_tar(tmp_path / "big.tar", {"big.jpg": os.urandom(5000)}, mode="w")
    with pytest.raises(PayloadTooLarge, match="big.jpg"):
        extract_archive(big, tmp_path / "o2", ArchiveLimits(max_member_bytes=4096))
    with pytest.raises(PayloadTooLarge):
        list(iter_archive(big, ArchiveLimits(max_member_bytes=4096)))


def test_not_an_archive_is_a_bad_request(tmp_path):
    path = tmp_path / "x.zip"
    path.write_bytes(b"hello, not an archive")
    with pytest.raises(BadRequest):
        extract_archive(path, tmp_path / "out", ArchiveLimits())


def test_manifest_lines_accept_strings_and_objects():
    lines = ['"a.jpg"', "", '{"path": "b/c.png", "id": 3}']
    assert manifest_paths(lines) == ["a.jpg", "b/c.png"]
    with pytest.raises(BadRequest, match="line 2"):
        manifest_paths(['"a.jpg"', "{not json"])
    with pytest.raises(BadRequest, match="line 1"):
        manifest_paths(['{"path": 42}'])


def test_manifest_paths_must_stay_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.jpg").write_bytes(JPEG)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(JPEG)
    (root / "link-out.jpg").symlink_to(outside)
    (root / "dir-out").symlink_to(tmp_path)
    (root / "link-in.jpg").symlink_to(root / "sub" / "ok.jpg")

    assert resolve_under_root("sub/ok.jpg", root) == (root / "sub" / "ok.jpg").resolve()
    assert resolve_under_root(str(root / "sub" / "ok.jpg"), root) == (root / "sub" / "ok.jpg").resolve()
    assert resolve_under_root("link-in.jpg", root) == (root / "sub" / "ok.jpg").resolve()
    assert resolve_under_root("missing.jpg", root) == root.resolve() / "missing.jpg"  # listed with an error later
    for bad in (
        "../secret.jpg",
        "sub/../../secret.jpg",
        str(outside),
        "/etc/passwd",
        "link-out.jpg",
        "dir-out/secret.jpg",
        "sub/../sub/ok.jpg",
    ):
        with pytest.raises(Forbidden):
            resolve_under_root(bad, root)


def test_manifests_take_plain_paths_one_per_line():
    lines = ["a.jpg", "  sub dir/b c.png  ", "", '"q.jpg"', '{"path": "d.jpg"}', b"bytes/e.jpg\r"]
    assert manifest_paths(lines) == ["a.jpg", "sub dir/b c.png", "q.jpg", "d.jpg", "bytes/e.jpg"]
    with pytest.raises(BadRequest, match=r"line 2: starts like JSON but is not .* give a plain path"):
        manifest_paths(["a.jpg", "{broken"])


def test_a_tar_of_a_folder_made_with_dot_is_accepted(tmp_path):
    # `tar -czf photos.tgz -C photos .`: entries ./ and ./sub/ are directories, not escapes.
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(JPEG)
    (photos / "sub" / "b.png").write_bytes(JPEG)
    archive = tmp_path / "photos.tgz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(photos), "."], check=True, timeout=60)
    with tarfile.open(archive) as opened:
        directories = {m.name.rstrip("/") for m in opened.getmembers() if m.isdir()}
    assert directories == {".", "./sub"}  # what GNU tar writes
    assert extract_archive(archive, tmp_path / "out", ArchiveLimits()) == ["a.jpg", "sub/b.png"]
    assert sorted(name for name, _ in iter_archive(archive, ArchiveLimits())) == ["a.jpg", "sub/b.png"]


@pytest.mark.parametrize("name", ["./../evil.jpg", "./../"])
def test_dot_directories_do_not_excuse_a_real_escape(tmp_path, name):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as archive:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        archive.addfile(root)
        entry = tarfile.TarInfo(name)
        entry.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
        entry.size = 0
        archive.addfile(entry, io.BytesIO(b""))
    with pytest.raises(UnsafeArchive, match="outside the archive"):
        extract_archive(path, tmp_path / "out", ArchiveLimits())
