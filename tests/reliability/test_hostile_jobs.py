"""Scoring jobs against a real server: special files in the job root, a directory swapped for a
symlink out of the root while a job reads through it, archives and manifests built to make the
service fail (names past NAME_MAX and PATH_MAX, a name that is both a file and a folder, names
and manifests that are not UTF-8, too many entries, deep nesting, huge integers, manifests over
their limit), and job folders orphaned by SIGKILL. A well-behaved client is served throughout and
peak RSS stays bounded.

Sizes: RELIABILITY_SWAP_JOB_PATHS (CI 400, `make fuzz` 4000), RELIABILITY_MANIFEST_BYTES (the
server's max_manifest_bytes: CI 256 KiB, `make fuzz` the 16 MiB default).
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import time

import hostile_files as hostile
import httpx
import pytest
from reliability_lib import Bystander, LiveServer, job_rows, photo_bytes, scale, wait_job
from test_safe_open import SWAPPER

pytestmark = pytest.mark.slow

SWAP_JOB_PATHS = scale("RELIABILITY_SWAP_JOB_PATHS", 400)
MANIFEST_BYTES = scale("RELIABILITY_MANIFEST_BYTES", 256 * 1024)
MAX_ENTRIES = 1000
PEAK_RSS_LIMIT_MIB = 400


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs-tree")
    root, outside = base / "root", base / "outside"
    (root / "dir").mkdir(parents=True)
    outside.mkdir()
    (root / "photo.jpg").write_bytes(photo_bytes("astronaut"))
    (root / "dir" / "img.jpg").write_bytes(photo_bytes("astronaut"))
    (outside / "img.jpg").write_bytes(photo_bytes("chelsea"))
    os.mkfifo(root / "fifo.jpg")
    (root / "folder.jpg").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock.jpg"))
    specials = {"fifo.jpg": "FIFO", "folder.jpg": "directory", "sock.jpg": "socket"}
    if os.geteuid() == 0:
        os.mknod(root / "zero.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
        specials["zero.jpg"] = "device"
    yield base, root, outside, specials
    listener.close()


@pytest.fixture(scope="module")
def server(reliability_model, tree):
    base, root, _, _ = tree
    live = LiveServer(
        reliability_model,
        base,
        {
            "VITSERVE_JOB_ROOT": str(root),
            "VITSERVE_MAX_ARCHIVE_ENTRIES": str(MAX_ENTRIES),
            "VITSERVE_MAX_MANIFEST_BYTES": str(MANIFEST_BYTES),
            "VITSERVE_MAX_JOB_IMAGES": str(max(SWAP_JOB_PATHS, MANIFEST_BYTES // 8)),
        },
    )
    try:
        yield live.wait_ready()
    finally:
        assert live.terminate(timeout_s=30) == 0  # nothing left blocked in a read


def _job(server, paths: list[str]) -> str:
    created = httpx.post(f"{server.url}/v1/jobs", json={"paths": paths}, timeout=60)
    assert created.status_code == 202, created.text
    return created.json()["id"]


def test_special_files_are_listed_with_an_error_and_never_block(server, tree):
    _, _, _, specials = tree
    with Bystander(server.url) as bystander:
        first = _job(server, [*specials, "photo.jpg"])
        second = _job(server, ["photo.jpg"])  # queued behind the first: must not wait for ever
        wait_job(server.url, first, timeout_s=60)
        wait_job(server.url, second, timeout_s=60)
    rows = {row["path"]: row for row in job_rows(server.url, first)}
    for name, kind in specials.items():
        assert rows[name]["error"]["code"] == "not_a_regular_file" and kind in rows[name]["error"]["message"], rows
    assert "labels" in rows["photo.jpg"]
    assert "labels" in job_rows(server.url, second)[0]
    bystander.assert_served()


def test_a_directory_swapped_for_a_symlink_during_a_job_never_scores_outside(server, tree):
    _, root, outside, _ = tree

    def labels(name: str) -> list[str]:
        response = httpx.post(
            f"{server.url}/v1/classify", content=photo_bytes(name), headers={"Content-Type": "image/jpeg"}, timeout=30
        )
        return [p["label"] for p in response.json()["predictions"]]

    inside, outside_labels = labels("astronaut"), labels("chelsea")
    assert inside != outside_labels, "pick photos the model tells apart, or a leak would go unseen"
    job_id = _job(server, ["dir/img.jpg"] * SWAP_JOB_PATHS)  # checked at submission: dir is a directory now
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(root), str(outside)])
    try:
        job = wait_job(server.url, job_id, timeout_s=300)
    finally:
        swapper.kill()
        swapper.wait()
        if (root / "dir").is_symlink():  # leave the tree as it was: dir a directory, alt gone
            os.rename(root / "dir", root / "swapped")
            os.rename(root / "alt", root / "dir")
            os.unlink(root / "swapped")
        else:
            os.unlink(root / "alt")
    rows = job_rows(server.url, job_id)
    codes: dict[str, int] = {}
    for row in rows:
        code = row["error"]["code"] if "error" in row else ("LEAKED" if row["labels"] != inside else "inside")
        codes[code] = codes.get(code, 0) + 1
    print(f"\n{len(rows)} reads through a directory swapped for a symlink out of the root: {codes}")
    assert len(rows) == job["total"] == SWAP_JOB_PATHS
    assert "LEAKED" not in codes
    assert set(codes) <= {"inside", "forbidden", "unreadable"}, codes
    assert codes.get("forbidden", 0) > 0, "the swap never raced a read: the test proves nothing"


def _zip(entries: dict[str, bytes]) -> bytes:
    return hostile.zip_with(entries)


def _tar(names: list[str], data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as t:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip_claiming_entries(count: int) -> bytes:
    data = bytearray(_zip({"a.jpg": b"x"}))
    at = data.rfind(b"PK\x05\x06")
    data[at + 8 : at + 12] = (count & 0xFFFF).to_bytes(2, "little") * 2
    return bytes(data)


def _zip_with_utf8_flag_and_bad_bytes() -> bytes:
    data = bytearray(_zip({"ab.jpg": b"x"}))
    for signature, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        at = data.find(signature)
        data[at + flag_at + 1] |= 0x08  # general purpose bit 11: names are UTF-8
        data[at + name_at : at + name_at + 2] = b"\xff\xfe"
    return bytes(data)


def _archive_cases() -> dict[str, tuple[bytes, str, int, str]]:
    jpeg = photo_bytes("astronaut")
    long_part = "n" * 256 + ".jpg"
    deep = "/".join(["d" * 200] * 16) + "/a.jpg"  # 3.2 KB: past PATH_MAX once under the job folder
    many = {f"notes/{i}.txt": b"" for i in range(MAX_ENTRIES + 1)}
    return {
        "zip name of 260 bytes": (_zip({long_part: jpeg}), "application/zip", 422, "over 255"),
        "tar name of 260 bytes": (_tar([long_part]), "application/x-tar", 422, "over 255"),
        "zip path of 3.2 KB": (_zip({deep: jpeg}), "application/zip", 422, "bytes, over"),
        "tar path of 3.2 KB": (_tar([deep]), "application/x-tar", 422, "bytes, over"),
        "zip x.png then x.png/y.png": (_zip({"x.png": jpeg, "x.png/y.png": jpeg}), "application/zip", 422, "both"),
        "tar x.png/y.png then x.png": (_tar(["x.png/y.png", "x.png"]), "application/x-tar", 422, "both"),
        "tar a/x.png then a/x.png/deeper/y.png": (
            _tar(["a/x.png", "a/x.png/deeper/y.png"]),
            "application/x-tar",
            422,
            "both",
        ),
        "tar name not UTF-8": (_tar(["bad-\udcff\udcfe.jpg"]), "application/x-tar", 422, "UTF-8"),
        "zip name flagged UTF-8 but not": (_zip_with_utf8_flag_and_bad_bytes(), "application/zip", 400, "utf-8"),
        f"zip of {MAX_ENTRIES + 1} entries": (_zip(many), "application/zip", 413, "max_archive_entries"),
        f"tar.gz of {MAX_ENTRIES + 1} entries": (
            hostile.tar_with(many, gzip=True),
            "application/gzip",
            413,
            "max_archive_entries",
        ),
        "zip claiming 65535 entries": (_zip_claiming_entries(65535), "application/zip", 413, "max_archive_entries"),
    }


def _manifest_cases() -> dict[str, tuple[bytes, str, int, str]]:
    deep = b"[" * 100_000 + b"]" * 100_000
    huge_int = b"1" * 5000
    return {
        "lines: invalid UTF-8": (b'"photo.jpg"\n"\xff\xfe.jpg"\n', "application/x-ndjson", 400, "UTF-8"),
        "lines: 100k-deep nesting": (deep + b"\n", "application/x-ndjson", 400, "nested"),
        "lines: a 5000-digit integer": (huge_int + b"\n", "application/x-ndjson", 400, "line 1"),
        "json: 100k-deep nesting": (b'{"paths": ' + deep + b"}", "application/json", 413, "arrays"),
        "json: a 5000-digit integer": (b'{"paths": [' + huge_int + b"]}", "application/json", 400, "digits"),
        "json: invalid UTF-8": (b'{"paths": ["\xff.jpg"]}', "application/json", 400, "UTF-8"),
        "json: objects by the thousand": (
            b'{"paths": [' + b"{}," * 20_000 + b"{}]}",
            "application/json",
            413,
            "objects",
        ),
        "json: over max_manifest_bytes": (
            json.dumps({"paths": ["photo.jpg"] * (MANIFEST_BYTES // 10)}).encode(),
            "application/json",
            413,
            "max_manifest_bytes",
        ),
    }


def test_hostile_archives_and_manifests_get_a_4xx_naming_the_problem(server):
    cases = {**_archive_cases(), **_manifest_cases()}
    with Bystander(server.url) as bystander:
        for name, (body, content_type, status, word) in cases.items():
            response = httpx.post(
                f"{server.url}/v1/jobs", content=body, headers={"Content-Type": content_type}, timeout=120
            )
            assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
            assert word.lower() in response.json()["error"]["message"].lower(), f"{name}: {response.text[:300]}"
        # The same manifest over the limit, streamed without a Content-Length: stopped while streaming.
        body = cases["json: over max_manifest_bytes"][0]
        chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
        response = httpx.post(
            f"{server.url}/v1/jobs", content=chunks, headers={"Content-Type": "application/json"}, timeout=120
        )
        assert response.status_code == 413 and "max_manifest_bytes" in response.text, response.text
    bystander.assert_served()
    peak = server.peak_rss_kib() / 1024
    print(f"\npeak RSS {peak:.0f} MiB")
    assert peak < PEAK_RSS_LIMIT_MIB
    jobs = server.log_path.parent / "data" / "jobs"
    assert not jobs.exists() or all(_accepted(server, folder.name) for folder in jobs.iterdir())


def _accepted(server, job_id: str) -> bool:
    return httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).status_code == 200


def test_a_manifest_as_large_as_allowed_is_parsed_off_the_event_loop(server):
    line = b'"photo.jpg"\n'
    body = line * (MANIFEST_BYTES // len(line))
    with Bystander(server.url, interval_s=0.02) as bystander:
        created = httpx.post(
            f"{server.url}/v1/jobs", content=body, headers={"Content-Type": "application/x-ndjson"}, timeout=300
        )
    assert created.status_code == 202, created.text[:300]
    assert created.json()["total"] == MANIFEST_BYTES // len(line)
    httpx.delete(f"{server.url}/v1/jobs/{created.json()['id']}", timeout=30)
    bystander.assert_served()


def _refused_before_the_body(server, content_type: str, declared: int) -> httpx.Response:
    """Send only the headers of a request declaring ``declared`` body bytes; the answer must come anyway."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {declared}\r\n"
        conn.sendall(head.encode() + b"\r\n")
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return httpx.Response(status, content=body)


def test_what_is_not_allowed_is_refused_before_the_body_is_read(server, start_server):
    response = _refused_before_the_body(server, "application/x-ndjson", 256 << 20)
    assert response.status_code == 413 and "max_manifest_bytes" in response.text, response.text
    response = _refused_before_the_body(server, "text/html", 256 << 20)
    assert response.status_code == 415, response.text
    no_root = start_server()  # manifests disabled
    for content_type in ("application/x-ndjson", "application/json"):
        response = _refused_before_the_body(no_root, content_type, 256 << 20)
        assert response.status_code == 403 and "VITSERVE_JOB_ROOT" in response.text, response.text


def test_job_folders_orphaned_by_sigkill_are_removed_at_start_up(start_server, tmp_path):
    env = {"VITSERVE_DATA_DIR": str(tmp_path / "data"), "RELIABILITY_ENGINE_DELAY_S": 0.2, "VITSERVE_MAX_BATCH_SIZE": 1}
    server = start_server(**env)
    images = {f"{i:02d}.jpg": photo_bytes("astronaut") for i in range(30)}
    queued = httpx.post(f"{server.url}/v1/jobs", content=_zip(images), headers={"Content-Type": "application/zip"})
    assert queued.status_code == 202, queued.text
    unfinished = queued.json()["id"]
    jobs = tmp_path / "data" / "jobs"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:  # an upload cut short
        conn.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/zip\r\nContent-Length: 10000000\r\n\r\n"
        )
        conn.sendall(b"PK" + b"\x00" * 200_000)
        deadline = time.monotonic() + 30
        while len(list(jobs.iterdir())) < 2:
            assert time.monotonic() < deadline, list(jobs.iterdir())
            time.sleep(0.05)
        server.kill()
    (jobs / "left-by-a-crash").mkdir()
    (jobs / "left-by-a-crash" / "upload").write_bytes(b"x" * 1000)
    orphans = {p.name for p in jobs.iterdir()} - {unfinished}
    assert len(orphans) == 2, orphans
    restarted = start_server(**env)
    assert {p.name for p in jobs.iterdir()} <= {unfinished}, list(jobs.iterdir())  # the unfinished job keeps its files
    job = wait_job(restarted.url, unfinished, timeout_s=120)
    assert job["scored"] == len(images)
    assert not (jobs / unfinished).exists()  # and a finished job's folder goes too
