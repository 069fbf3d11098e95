"""The app in-process (fake engine): API key, readiness around warm-up, draining, errors' JSON shape."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.http.app import create_app


def _wait_ready(client: TestClient, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.01)


def test_api_key_guards_everything_but_probes_and_metrics(make_fake_engine, encode_photo):
    app = create_app(Settings(api_key="s3cret-key"), engine=make_fake_engine())
    jpeg = encode_photo("coffee")
    with TestClient(app) as client:
        _wait_ready(client)
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200, path
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic s3cret-key"},
            {"Authorization": "s3cret-key"},
        ):
            r = client.post("/v1/classify", content=jpeg, headers={"Content-Type": "image/jpeg", **headers})
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/v1/models").status_code == 401
        ok = client.post(
            "/v1/classify", content=jpeg, headers={"Content-Type": "image/jpeg", "Authorization": "Bearer s3cret-key"}
        )
        assert ok.status_code == 200 and ok.json()["model"] == "fake_vit"
        metrics = client.get("/metrics").text
        assert 'route="/v1/classify",status="401"' in metrics


def test_not_ready_until_warm_up_finishes(make_fake_engine, encode_photo):
    release = threading.Event()
    engine = make_fake_engine()
    engine.warmup = lambda sizes: (release.wait(10), {})[1]
    app = create_app(Settings(max_batch_size=4), engine=engine)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "warming_up"
        early = client.post("/v1/classify", content=encode_photo("coffee"), headers={"Content-Type": "image/jpeg"})
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        assert early.headers["Retry-After"] == "1"
        release.set()
        _wait_ready(client)
        assert (
            client.post(
                "/v1/classify", content=encode_photo("coffee"), headers={"Content-Type": "image/jpeg"}
            ).status_code
            == 200
        )


def test_warm_up_covers_one_and_the_max_batch(make_fake_engine):
    engine = make_fake_engine()
    with TestClient(create_app(Settings(max_batch_size=16), engine=engine)) as client:
        _wait_ready(client)
    assert sorted(set(engine.warmed)) == [1, 16]


def test_draining_refuses_new_work_but_keeps_probes(make_fake_engine, encode_photo):
    app = create_app(Settings(), engine=make_fake_engine())
    with TestClient(app) as client:
        _wait_ready(client)
        app.state.service.draining = True
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        refused = client.post("/v1/classify", content=encode_photo("coffee"), headers={"Content-Type": "image/jpeg"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200


def test_inference_failure_is_a_json_500_and_the_app_recovers(make_fake_engine, encode_photo):
    fail = {"on": True}
    engine = make_fake_engine(fail_when=lambda batch: fail["on"])
    with TestClient(create_app(Settings(), engine=engine)) as client:
        _wait_ready(client)
        r = client.post("/v1/classify", content=encode_photo("coffee"), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
        fail["on"] = False
        assert (
            client.post(
                "/v1/classify", content=encode_photo("coffee"), headers={"Content-Type": "image/jpeg"}
            ).status_code
            == 200
        )


def test_top_k_larger_than_the_class_count_returns_every_class(make_fake_engine, encode_photo):
    with TestClient(create_app(Settings(), engine=make_fake_engine(num_classes=3))) as client:
        _wait_ready(client)
        r = client.post("/v1/classify?top_k=50", content=encode_photo("coffee"), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200 and [p["index"] for p in r.json()["predictions"]] == [2, 1, 0]


def test_validation_errors_use_the_same_json_shape(make_fake_engine):
    with TestClient(create_app(Settings(), engine=make_fake_engine())) as client:
        _wait_ready(client)
        r = client.post("/v1/classify?top_k=many", content=b"x", headers={"Content-Type": "image/png"})
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "validation_error" and "top_k" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue_size": 4, "max_batch_size": 8}, "max_queue_size"),
        ({"providers": "gpu"}, "unknown provider"),
        ({"warmup_batch_sizes": "1,x"}, "warmup_batch_sizes"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
    ],
)
def test_settings_are_validated_with_clear_messages(bad, match):
    with pytest.raises(ValueError, match=match):
        Settings(**bad)


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("VITSERVE_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("VITSERVE_MAX_QUEUE_DELAY_MS", "7.5")
    monkeypatch.setenv("VITSERVE_LOG_LEVEL", "WARNING")
    s = Settings()
    assert (s.max_batch_size, s.max_queue_delay_ms, s.log_level) == (32, 7.5, "warning")
    assert s.model.name == "model.onnx" and s.model.parent.name == "digits"
    assert s.warmup_sizes() == [1, 32]


def test_cli_reports_bad_settings_and_missing_model(tmp_path, capsys, monkeypatch):
    from service.cli import main

    assert main(["serve", "--max-batch-size", "0", "--model", str(tmp_path / "m.onnx")]) == 2
    assert "--max-batch-size / VITSERVE_MAX_BATCH_SIZE" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_metrics_count_images_batches_and_rate(make_fake_engine, encode_photo):
    import re

    with TestClient(create_app(Settings(), engine=make_fake_engine())) as client:
        _wait_ready(client)
        for _ in range(3):
            assert (
                client.post(
                    "/v1/classify", content=encode_photo("rocket"), headers={"Content-Type": "image/jpeg"}
                ).status_code
                == 200
            )
        client.post("/v1/classify", content=b"junk", headers={"Content-Type": "image/jpeg"})
        text = client.get("/metrics").text

    def value(name: str) -> float:
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE).group(1))

    assert value("vitserve_images_total") == 3 and value("vitserve_batch_size_sum") == 3
    assert value("vitserve_preprocess_seconds_count") == 3 and value("vitserve_inference_seconds_count") == 3
    assert value("vitserve_images_per_second") == pytest.approx(3 / 10)  # 3 images in the 10 s window
    assert value('vitserve_image_errors_total{code="invalid_image"}') == 1
    assert value("vitserve_queue_depth") == 0 and value("vitserve_ready") == 1
    assert value('vitserve_requests_total{method="POST",route="/v1/classify",status="422"}') == 1


def test_gpu_hosts_get_a_bigger_default_batch_unless_one_is_set(make_fake_engine):
    from service.serving.lifecycle import GPU_DEFAULT_MAX_BATCH_SIZE

    for settings, expected in ((Settings(), GPU_DEFAULT_MAX_BATCH_SIZE), (Settings(max_batch_size=8), 8)):
        engine = make_fake_engine()
        engine.on_gpu = True
        with TestClient(create_app(settings, engine=engine)) as client:
            _wait_ready(client)
            assert client.get("/v1/models").json()["batching"]["max_batch_size"] == expected
        assert max(engine.warmed) == expected  # warm-up covered the batch size actually served
    cpu = make_fake_engine()
    with TestClient(create_app(Settings(), engine=cpu)) as client:
        _wait_ready(client)
        assert client.get("/v1/models").json()["batching"]["max_batch_size"] == 8


def test_batch_json_accepts_wrapped_base64_and_data_urls(make_fake_engine, encode_photo):
    import base64
    import textwrap

    encoded = base64.b64encode(encode_photo("coffee")).decode()
    images = [
        {"id": "wrapped", "data": "\n".join(textwrap.wrap(encoded, 76))},
        {"id": "url", "data": "data:image/jpeg;base64," + encoded},
        {"id": "bad", "data": encoded[:100] + "*" + encoded[100:]},
    ]
    with TestClient(create_app(Settings(), engine=make_fake_engine())) as client:
        _wait_ready(client)
        results = client.post("/v1/classify/batch", json={"images": images}).json()["results"]
    assert "predictions" in results[0] and "predictions" in results[1]
    assert results[2]["error"]["code"] == "bad_request" and "base64" in results[2]["error"]["message"]
