"""Fixtures of the reliability tests: the exported test model, a server factory, and the shared
hardened server (API key on, a job root with a symlink out of it). Helpers: reliability_lib.py."""

from __future__ import annotations

import secrets
import stat
import subprocess
from pathlib import Path

import pytest
from reliability_lib import PHOTOS, SERVICE_FIXTURES, Guarded, LiveServer, photo_bytes


@pytest.fixture(scope="session")
def reliability_model(tmp_path_factory) -> Path:
    """A random-weight ViT-tiny (32 px, 10 labels) exported by model.export, with its metadata."""
    path = tmp_path_factory.mktemp("reliability-model") / "tiny_vit.onnx"
    SERVICE_FIXTURES.export_tiny_vit(path)
    return path


@pytest.fixture
def start_server(reliability_model, tmp_path):
    """Factory: start_server(**env) -> a ready LiveServer; whatever is still running is killed afterwards."""
    started: list[LiveServer] = []

    def start(wait: bool = True, **env: str) -> LiveServer:
        server = LiveServer(reliability_model, tmp_path, {k: str(v) for k, v in env.items()})
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        if server.process.poll() is None:
            try:
                server.terminate(timeout_s=15)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture(scope="module")
def fake_gs(tmp_path_factory):
    """A `gs` on the server's PATH that records being run: Pillow's EPS decoder would call it."""
    folder = tmp_path_factory.mktemp("fake-gs")
    marker = folder / "gs-ran"
    script = folder / "gs"
    script.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo 10.0 && exit 0\necho "$@" >> {marker}\nexit 1\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder, marker


@pytest.fixture(scope="session")
def guarded(reliability_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("guarded")
    job_root, outside = base / "job-root", base / "outside"
    job_root.mkdir()
    outside.mkdir()
    for name in PHOTOS:
        (job_root / f"{name}.jpg").write_bytes(photo_bytes(name))
    (outside / "secret.jpg").write_bytes(photo_bytes("coffee"))
    (job_root / "escape.jpg").symlink_to(outside / "secret.jpg")  # a symlink out of the root
    (job_root / "escape-dir").symlink_to(outside, target_is_directory=True)
    api_key = "rk-" + secrets.token_hex(16)
    server = LiveServer(
        reliability_model,
        base,
        {"VITSERVE_API_KEY": api_key, "VITSERVE_JOB_ROOT": str(job_root), "VITSERVE_DATA_DIR": str(base / "data")},
    )
    try:
        server.wait_ready()
        yield Guarded(server, api_key, job_root, base / "data", outside)
    finally:
        try:
            server.terminate(timeout_s=15)
        except subprocess.TimeoutExpired:
            server.kill()
