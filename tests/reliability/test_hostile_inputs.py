"""A corpus of hostile files, generated here, sent to a real server (API key on, job root set).

Each input gets its documented 4xx (errors.py, jobs/sources.py): 422 invalid_image for images
that cannot be classified, 400 for malformed requests and archives, 413 for bodies and archives
over their limits, 422 unsafe_archive for archive entries that could escape, 403 for manifest
paths outside the job root. Every error body is our JSON shape, without a stack trace or a
server-side path. Afterwards: nothing was written outside the data dir, the server still
classifies photos, and its peak RSS (VmHWM) stayed bounded.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hostile_files as hostile
import httpx
import pytest
from reliability_lib import assert_clean_error, photo_bytes

pytestmark = pytest.mark.slow

# Peak RSS allowed for the whole corpus; the largest legitimate decode here (36 Mpx PNG, twice in
# parallel) needs ~250 MB on top of the ~110 MB idle server.
PEAK_RSS_LIMIT_MIB = 700


def post_image(guarded, data: bytes, content_type: str = "image/png") -> httpx.Response:
    return httpx.post(
        f"{guarded.url}/v1/classify", content=data, timeout=60, headers={**guarded.auth, "Content-Type": content_type}
    )


def post_job(guarded, data: bytes, content_type: str = "application/zip", **kwargs) -> httpx.Response:
    return httpx.post(
        f"{guarded.url}/v1/jobs",
        content=data,
        timeout=120,
        headers={**guarded.auth, "Content-Type": content_type},
        **kwargs,
    )


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return photo_bytes("astronaut")


@pytest.fixture(scope="module")
def png() -> bytes:
    return photo_bytes("coffee", "PNG")


def test_images_that_cannot_be_classified_get_422(guarded, jpeg, png):
    corpus = {
        "png header claiming 50k x 50k": (hostile.png_claiming(50_000, 50_000), "image/png"),
        "jpeg header claiming 50k x 50k": (hostile.jpeg_claiming(jpeg, 50_000, 50_000), "image/jpeg"),
        "jpeg header claiming 65535 x 65535": (hostile.jpeg_claiming(jpeg, 65_535, 65_535), "image/jpeg"),
        "png claiming 8k x 8k (64 Mpx, over the 40 Mpx limit)": (hostile.png_claiming(8000, 8000), "image/png"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "image/jpeg"),
        "truncated png": (png[: len(png) // 2], "image/png"),
        "jpeg header only": (jpeg[:600], "image/jpeg"),
        "png with garbage pixel data": (hostile.corrupt_png(png), "image/png"),
        "0 bytes": (b"", "image/png"),
        "1 byte": (b"\x89", "image/png"),
        "1 byte as jpeg": (b"\xff", "image/jpeg"),
        "text as an image": (b"GET /etc/passwd HTTP/1.1\r\n" * 10, "image/jpeg"),
    }
    for name, (data, content_type) in corpus.items():
        response = post_image(guarded, data, content_type)
        try:
            assert_clean_error(guarded, response, 422, "invalid_image")
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def test_bombs_inside_a_json_batch_fail_only_their_own_item(guarded, jpeg):
    images = [
        {"id": "bomb", "data": base64.b64encode(hostile.png_claiming(50_000, 50_000)).decode()},
        {"id": "empty-jpeg", "data": base64.b64encode(jpeg[:10]).decode()},
        {"id": "photo", "data": base64.b64encode(jpeg).decode()},
    ]
    response = httpx.post(f"{guarded.url}/v1/classify/batch", json={"images": images}, headers=guarded.auth, timeout=60)
    assert response.status_code == 200, response.text
    results = {r["id"]: r for r in response.json()["results"]}
    assert results["bomb"]["error"]["code"] == results["empty-jpeg"]["error"]["code"] == "invalid_image"
    assert len(results["photo"]["predictions"]) == 5


def test_largest_allowed_decompression_is_served_with_bounded_memory(guarded):
    # 6000 x 6000 black PNG: ~50 KB on the wire, 36 Mpx decoded (under the 40 Mpx limit): legitimate.
    bomb = hostile.png_bomb_under_limit(6000)
    assert len(bomb) < 200_000
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: post_image(guarded, bomb), range(2)))
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]


def test_huge_multipart_part_counts_are_refused(guarded):
    # Too many image files for /v1 is 413 (more images than max_batch_images); too many parts
    # otherwise is a malformed request, 400. Parsing stops at the limit: thousands are never spooled.
    files = {
        "/v1/classify/batch": ("files", 5000, 413, "payload_too_large"),
        "/v1/classify": ("file", 2000, 413, "payload_too_large"),
        "/v1/jobs": ("file", 2000, 400, "bad_request"),
    }
    for path, (field, count, status, code) in files.items():
        for parts, expected in (
            ([(field, f"{i}.png", b"x") for i in range(count)], (status, code)),
            ([(f"field{i}", None, b"v") for i in range(5000)], (400, "bad_request")),
        ):
            body, content_type = hostile.multipart(parts)
            response = httpx.post(
                f"{guarded.url}{path}", content=body, timeout=60, headers={**guarded.auth, "Content-Type": content_type}
            )
            assert_clean_error(guarded, response, *expected)
            assert "too many" in response.json()["error"]["message"].lower(), response.text


def test_hostile_archives_get_their_documented_4xx(guarded, jpeg, tmp_path):
    escape_target = guarded.data_dir.parent / "escaped.jpg"
    cases = {
        "zip bomb (150 MB of zeros)": (hostile.zip_bomb(150 << 20), "application/zip", 413, "payload_too_large"),
        "zip entry ../../escaped.jpg": (
            hostile.zip_with({"../../escaped.jpg": jpeg}),
            "application/zip",
            422,
            "unsafe_archive",
        ),
        "zip entry with absolute path": (
            hostile.zip_with({str(escape_target): jpeg}),
            "application/zip",
            422,
            "unsafe_archive",
        ),
        "zip entry with backslashes": (
            hostile.zip_with({"..\\..\\escaped.jpg": jpeg}),
            "application/zip",
            422,
            "unsafe_archive",
        ),
        "zip symlink member": (
            hostile.zip_with({"a.jpg": jpeg}, symlinks={"link.jpg": "/etc/passwd"}),
            "application/zip",
            422,
            "unsafe_archive",
        ),
        "zip duplicate names": (
            hostile.zip_with({"a.jpg": jpeg, "./a.jpg": jpeg}),
            "application/zip",
            422,
            "unsafe_archive",
        ),
        "zip with corrupt deflate data": (
            hostile.corrupt_zip({"a.jpg": b"\x00" * 100_000}),
            "application/zip",
            400,
            "bad_request",
        ),
        "zip member with compression method 99 (AES)": (
            hostile.zip_patched({"a.jpg": jpeg}, method=99),
            "application/zip",
            400,
            "bad_request",
        ),
        "encrypted zip member": (
            hostile.zip_patched({"a.jpg": jpeg}, encrypted=True),
            "application/zip",
            400,
            "bad_request",
        ),
        "truncated zip": (hostile.zip_with({"a.jpg": jpeg})[:-40], "application/zip", 400, "bad_request"),
        "tar entry ../escaped.jpg": (
            hostile.tar_with({"../escaped.jpg": jpeg}),
            "application/x-tar",
            422,
            "unsafe_archive",
        ),
        "tar symlink out": (
            hostile.tar_with({}, symlinks={"link.jpg": "/etc/passwd"}),
            "application/x-tar",
            422,
            "unsafe_archive",
        ),
        "tar hard link out": (
            hostile.tar_with({}, hardlinks={"link.jpg": "/etc/passwd"}),
            "application/x-tar",
            422,
            "unsafe_archive",
        ),
        "tar fifo": (hostile.tar_with({}, fifos=("pipe.jpg",)), "application/x-tar", 422, "unsafe_archive"),
        "truncated tar.gz": (
            hostile.tar_with({"a.jpg": jpeg}, gzip=True)[:-200],
            "application/gzip",
            400,
            "bad_request",
        ),
        "0-byte archive": (b"", "application/zip", 400, "bad_request"),
        "1-byte archive": (b"P", "application/zip", 400, "bad_request"),
        "archive without images": (hostile.zip_with({"notes.txt": b"hi"}), "application/zip", 400, "bad_request"),
    }
    for name, (data, content_type, status, code) in cases.items():
        response = post_job(guarded, data, content_type)
        try:
            assert_clean_error(guarded, response, status, code, sent=data)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    assert not escape_target.exists() and not (guarded.data_dir.parent.parent / "escaped.jpg").exists()
    # Refused jobs leave nothing behind (their upload folder is removed).
    jobs = guarded.data_dir / "jobs"
    assert not jobs.exists() or all(job_files_of_accepted_jobs(guarded, path) for path in jobs.iterdir())


def job_files_of_accepted_jobs(guarded, folder: Path) -> bool:
    """True when ``folder`` belongs to a job the server accepted (202), not to a refused upload."""
    return httpx.get(f"{guarded.url}/v1/jobs/{folder.name}", headers=guarded.auth, timeout=10).status_code == 200


def test_manifest_paths_cannot_leave_the_job_root(guarded):
    secret = guarded.outside / "secret.jpg"
    for path in [
        "../outside/secret.jpg",
        str(secret),
        "/etc/passwd",
        "escape.jpg",
        "escape-dir/secret.jpg",
        "astronaut.jpg\x00.png",
        "./../outside/secret.jpg",
    ]:
        for body, content_type in [
            (json.dumps({"paths": [path]}).encode(), "application/json"),
            (json.dumps(path).encode() + b"\n", "application/x-ndjson"),
        ]:
            response = post_job(guarded, body, content_type)
            assert_clean_error(guarded, response, 403, "forbidden", sent=body)


def test_server_survived_with_bounded_memory(guarded):
    response = post_image(guarded, photo_bytes("chelsea"), "image/jpeg")
    assert response.status_code == 200 and len(response.json()["predictions"]) == 5
    peak_mib = guarded.server.peak_rss_kib() / 1024
    print(f"\nguarded server: peak RSS {peak_mib:.0f} MiB, RSS now {guarded.server.rss_kib() / 1024:.0f} MiB")
    assert peak_mib < PEAK_RSS_LIMIT_MIB
