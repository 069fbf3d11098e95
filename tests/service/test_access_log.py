"""Seeing what the service does: one access-log line per request, request ids, JSON logs, no PIL chatter."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import free_port, stop_server, wait_ready
from PIL import Image

from service.core.logs import JsonFormatter, configure_logging
from service.core.settings import Settings
from service.http.app import create_app

REPO = Path(__file__).resolve().parents[2]


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.01)


def _access(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vitserve.access"]


def test_one_access_line_per_request_with_route_template_status_bytes_and_id(make_fake_engine, encode_photo, caplog):
    caplog.set_level(logging.INFO, logger="vitserve.access")
    with TestClient(create_app(Settings(), engine=make_fake_engine())) as client:
        _wait_ready(client)
        caplog.clear()
        ok = client.post(
            "/v1/classify",
            content=encode_photo("coffee"),
            headers={"content-type": "image/jpeg", "x-request-id": "r-1"},
        )
        missing = client.get("/v1/models/nope")
    assert ok.status_code == 200 and missing.status_code == 404
    first, second = _access(caplog)
    assert (first.method, first.route, first.status, first.request_id) == ("POST", "/v1/classify", 200, "r-1")
    assert first.bytes == len(ok.content) and first.duration_ms > 0
    assert first.getMessage().startswith(f"POST /v1/classify 200 {len(ok.content)}B ")
    assert (second.route, second.status) == ("/v1/models/{model_name}", 404)  # the template, never the raw path
    assert second.request_id == missing.headers["x-request-id"]


def test_request_ids_are_kept_when_sane_made_otherwise_and_echoed_in_error_bodies(make_fake_engine):
    with TestClient(create_app(Settings(api_key="k"), engine=make_fake_engine())) as client:
        kept = client.get("/healthz", headers={"x-request-id": "trace-7.a:b"})
        assert kept.headers["x-request-id"] == "trace-7.a:b"
        for bad in ("has spaces", "x" * 200, "<script>"):
            made = client.get("/healthz", headers={"x-request-id": bad}).headers["x-request-id"]
            assert made != bad and len(made) == 32 and int(made, 16) >= 0
        v1 = client.get("/v1/models", headers={"x-request-id": "r-401"})
        assert v1.status_code == 401 and v1.json()["error"]["request_id"] == "r-401" == v1.headers["x-request-id"]
        assert v1.json()["error"]["code"] == "unauthorized"
        v2 = client.get("/v2/models/nope", headers={"x-request-id": "r-v2", "authorization": "Bearer k"})
        assert v2.status_code == 404 and v2.headers["x-request-id"] == "r-v2"
        assert set(v2.json()) == {"error"}  # the protocol's shape, exactly: the id is in the header


def test_json_lines_carry_the_extra_fields():
    record = logging.LogRecord("vitserve.access", logging.INFO, __file__, 1, "GET %s", ("/healthz",), None)
    record.route, record.status, record.request_id = "/healthz", 200, "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "GET /healthz" and line["level"] == "info" and line["logger"] == "vitserve.access"
    assert (line["route"], line["status"], line["request_id"]) == ("/healthz", 200, "abc")
    assert line["time"].endswith("Z")


def test_pil_never_logs_its_debug_chatter(caplog):
    from service.core.metadata import Preprocessing
    from service.runtime.preprocess import load_pixels

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        configure_logging("debug")
        assert sum(h.get_name() == "vitserve" for h in root.handlers) == 1
        configure_logging("debug")  # again: still one handler of ours
        assert sum(h.get_name() == "vitserve" for h in root.handlers) == 1
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, "PNG")
        with caplog.at_level(logging.DEBUG):
            load_pixels(buf.getvalue(), Preprocessing.timm_eval(32, 0.875, "bilinear"), max_pixels=10**6)
        assert not [r for r in caplog.records if r.name.startswith("PIL")]
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


@pytest.mark.slow
def test_a_real_server_with_json_logs_writes_only_json_lines(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")}
    env.update(PYTHONPATH=str(REPO), VITSERVE_LOG_FORMAT="json", VITSERVE_DATA_DIR=str(tmp_path / "data"))
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, log_path)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"x-request-id": "json-1"}).status_code == 200
    finally:
        stop_server(process)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]  # every line parses
    access = [line for line in lines if line["logger"] == "vitserve.access" and line.get("request_id") == "json-1"]
    assert [(a["method"], a["route"], a["status"]) for a in access] == [("GET", "/v1/models", 200)]
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines are JSON too
