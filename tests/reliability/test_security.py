"""Security against a real server with VITSERVE_API_KEY set: every route but the health probes,
metrics and the web page's files is 401 without the key or with a wrong one; the key comparison
is timing-safe (hmac.compare_digest, checked in the code and observed at run time); no route
fetches a URL a client gives; error bodies carry no stack trace and no server path.
(Job-root escapes by archive entries, symlinks and manifest paths: test_hostile_inputs.py.)
"""

from __future__ import annotations

import ast
import json
import socket
import threading
import time

import httpx
import pytest
from reliability_lib import REPO, SERVICE_FIXTURES, assert_clean_error, photo_bytes

from service.http import app as service_app
from service.http import middleware

pytestmark = pytest.mark.slow

SERVICE = REPO / "service"
WRONG_CREDENTIALS = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": "Basic {key}"},
    {"Authorization": "{key}"},
    {"Authorization": "Bearer {key}x"},
    {"Authorization": "Bearer {short}"},
    {"X-API-Key": "{key}"},
]


def _operations(guarded) -> list[tuple[str, str]]:
    document = httpx.get(f"{guarded.url}/openapi.json", headers=guarded.auth, timeout=10).json()
    operations = []
    for template, methods in document["paths"].items():
        path = template.replace("{model_name}", "m").replace("{model_version}", "1").replace("{job_id}", "j")
        operations += [(method.upper(), path) for method in methods]
    # Not in the schema but served: the docs themselves.
    return operations + [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]


def test_every_guarded_route_needs_the_key(guarded):
    operations = _operations(guarded)
    guarded_ops = [(m, p) for m, p in operations if p not in middleware.OPEN_PATHS]
    assert len(guarded_ops) >= 15
    tried = 0
    for method, path in guarded_ops:
        for template in WRONG_CREDENTIALS:
            headers = {k: v.format(key=guarded.api_key, short=guarded.api_key[:-1]) for k, v in template.items()}
            response = httpx.request(method, f"{guarded.url}{path}", headers=headers, content=b"x", timeout=10)
            assert_clean_error(guarded, response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert guarded.api_key not in response.text
            tried += 1
    print(f"\n{tried} unauthenticated requests over {len(guarded_ops)} guarded operations: all 401")
    for path in sorted(middleware.OPEN_PATHS):  # probes, metrics and the page stay reachable
        assert httpx.get(f"{guarded.url}{path}", timeout=10).status_code == 200, path


def test_the_key_comparison_is_hmac_compare_digest():
    """Code review, made executable: the only comparison of the key is hmac.compare_digest."""
    tree = ast.parse((SERVICE / "http" / "middleware.py").read_text())
    digest_calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "hmac.compare_digest"
    ]
    assert digest_calls and any("api_key" in ast.unparse(call) for call in digest_calls)
    for path in SERVICE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops
            ):
                assert "api_key" not in ast.unparse(node), f"{path}: non-constant-time key check {ast.unparse(node)}"


def test_compare_digest_is_what_runs(monkeypatch):
    """At run time every key check goes through hmac.compare_digest (in-process app, fake engine)."""
    from fastapi.testclient import TestClient

    from service.core.settings import Settings

    calls = []
    real = middleware.hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", recording)
    app = service_app.create_app(Settings(api_key="the-key"), engine=SERVICE_FIXTURES.FakeEngine())
    with TestClient(app) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer not-the-key"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer the-key"}).status_code == 200
    assert (b"not-the-key", b"the-key") in calls and (b"the-key", b"the-key") in calls


_NETWORK_MODULES = {
    "urllib.request",
    "urllib3",
    "requests",
    "httpx",
    "aiohttp",
    "http.client",
    "ftplib",
    "smtplib",
    "socket",
    "tritonclient",
}


# The server runner binds its listening socket itself, before the model loads, so that a busy
# port is one line (service/http/server.py bind_listener); it may listen, never connect.
_LISTENERS = {"service/http/server.py": {"socket"}, "service/serving/supervisor.py": {"socket"}}
# A front-end worker of the multi-process server reaches its engine process over a Unix socket in the
# server's private runtime directory: it may connect, but only with AF_UNIX sockets.
_UNIX_SOCKET_CLIENTS = {
    "service/serving/engine_client.py",
    "service/serving/engine_wire.py",
    "service/serving/engine_process.py",
    "service/serving/front_end.py",
}


def test_service_code_has_no_network_client():
    """No module of service/ imports anything that could open an outgoing connection."""
    for path in SERVICE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        relative = str(path.relative_to(REPO))
        if relative in _UNIX_SOCKET_CLIENTS:
            sockets = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "socket.socket"]
            assert all(ast.unparse(n.args[0]) == "socket.AF_UNIX" for n in sockets if n.args), (
                f"{path} opens IP sockets"
            )
            assert all(n.args for n in sockets), f"{path} opens a socket without naming its family"
            continue
        allowed = _LISTENERS.get(relative, set())
        if allowed:
            calls = {ast.unparse(n.func).rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.Call)}
            assert not calls & {"connect", "connect_ex", "create_connection"}, f"{path} opens a connection"
        for node in ast.walk(tree):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in set(names) - allowed:
                assert name not in _NETWORK_MODULES and not name.startswith(("urllib.request", "http.client")), (
                    f"{path.relative_to(REPO)} imports {name}"
                )


def test_no_route_fetches_a_client_given_url(guarded):
    """A listener on 127.0.0.1 is named as the image everywhere a client can put a string; nothing connects."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    connections = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            connections.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/photo.jpg"
    model = httpx.get(f"{guarded.url}/v1/models", headers=guarded.auth, timeout=10).json()["name"]
    h = guarded.auth
    try:
        requests = [
            ("/v1/classify", {"content": url.encode(), "headers": {**h, "Content-Type": "image/jpeg"}}),
            ("/v1/classify?url=" + url, {"content": b"", "headers": {**h, "Content-Type": "image/jpeg"}}),
            (
                "/v1/classify/batch",
                {"json": {"images": [{"id": "u", "data": url}, {"id": "v", "url": url}]}, "headers": h},
            ),
            ("/v1/jobs", {"json": {"paths": [url]}, "headers": h}),
            ("/v1/jobs", {"content": (url + "\n").encode(), "headers": {**h, "Content-Type": "application/x-ndjson"}}),
            (
                f"/v2/models/{model}/infer",
                {
                    "json": {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [url]}]},
                    "headers": h,
                },
            ),
        ]
        for path, kwargs in requests:
            response = httpx.post(f"{guarded.url}{path}", timeout=30, **kwargs)
            assert response.status_code in (200, 202, 400, 403, 404, 422), (path, response.text)
        # A job naming the URL, had it been accepted, would be scored in the background: give it time.
        assert (
            httpx.post(
                f"{guarded.url}/v1/classify",
                content=photo_bytes("rocket"),
                timeout=30,
                headers={**h, "Content-Type": "image/jpeg"},
            ).status_code
            == 200
        )
        stop.wait(1.0)
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
    assert connections == [], "the server connected to a client-given URL"


def test_a_symlink_swapped_in_after_submission_is_still_refused(start_server, tmp_path):
    """The manifest is checked at submission AND when each file is read: a file replaced by a symlink
    out of the root while the job waits gets a 'forbidden' row, never the outside file's scores."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.jpg").write_bytes(photo_bytes("astronaut"))
    (root / "swap.jpg").write_bytes(photo_bytes("coffee"))
    (outside / "secret.jpg").write_bytes(photo_bytes("chelsea"))
    server = start_server(VITSERVE_JOB_ROOT=str(root), VITSERVE_MAX_BATCH_SIZE=4, RELIABILITY_ENGINE_DELAY_S=0.05)
    paths = ["a.jpg"] * 120 + ["swap.jpg"]  # ~1.5 s of scoring before swap.jpg is read
    created = httpx.post(f"{server.url}/v1/jobs", json={"paths": paths}, timeout=30)
    assert created.status_code == 202, created.text  # swap.jpg is a plain file under the root now
    (root / "swap.jpg").unlink()
    (root / "swap.jpg").symlink_to(outside / "secret.jpg")
    job_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while (job := httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json())["state"] != "done":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    results = httpx.get(f"{server.url}/v1/jobs/{job_id}/results", timeout=30)
    rows = [json.loads(line) for line in results.text.splitlines()]
    assert job["scored"] == 120 and job["failed"] == 1, job  # it really was read after the swap
    last = rows[-1]
    assert last["path"] == "swap.jpg" and last["error"]["code"] == "forbidden", last
    assert str(outside) not in json.dumps(rows)
