"""Settings that cannot be silently wrong: unknown variables, empty keys, flags for every field, a busy port."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.cli import build_parser, main, subcommand_parser
from service.cli.serve import build_settings, settings_flag
from service.core.settings import DEFAULT_MODEL_PATH, Settings, UnknownVariables, check_environment
from service.http.app import create_app
from service.runtime.engine import Engine

REPO = Path(__file__).resolve().parents[2]


def test_a_mistyped_variable_stops_start_up_in_one_line_naming_the_closest(monkeypatch, capsys):
    monkeypatch.setenv("VITSERVE_MODLE", "/path/model.onnx")
    monkeypatch.setenv("VITSERVE_MAX_BATCHSIZE", "4")
    with pytest.raises(UnknownVariables):
        Settings()
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "VITSERVE_MODLE (did you mean VITSERVE_MODEL" in err
    assert "VITSERVE_MAX_BATCHSIZE (did you mean VITSERVE_MAX_BATCH_SIZE" in err


def test_the_projects_own_tool_variables_and_every_setting_are_accepted():
    environ = {"VITSERVE_GPU": "1", "VITSERVE_PUBLISH": "127.0.0.1:8001", "vitserve_max_batch_size": "4"}
    check_environment(environ)  # compose's and the tests' variables, and settings in any case
    check_environment({f"VITSERVE_{name.upper()}": "x" for name in Settings.model_fields})
    with pytest.raises(UnknownVariables, match="VITSERVE_NOPE"):
        check_environment({**environ, "VITSERVE_NOPE": "1"})


def test_an_empty_api_key_is_an_error_not_auth_off(monkeypatch, capsys):
    monkeypatch.setenv("VITSERVE_API_KEY", "")  # what docker-compose's ${VITSERVE_API_KEY:-} passed
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--api-key / VITSERVE_API_KEY: the API key is empty" in err and "--no-auth" in err
    with pytest.raises(ValueError, match="empty"):
        Settings(api_key="  ")


def test_without_a_key_only_loopback_or_an_explicit_no_auth_may_serve():
    assert Settings().api_key is None and Settings(host="::1").api_key is None
    with pytest.raises(ValueError, match="listening on 0.0.0.0 with no API key"):
        Settings(host="0.0.0.0")
    assert Settings(host="0.0.0.0", no_auth=True).no_auth
    assert Settings(host="0.0.0.0", api_key="k").api_key == "k"
    with pytest.raises(ValueError, match="contradict"):
        Settings(api_key="k", no_auth=True)


def test_start_up_log_says_whether_auth_is_on_and_never_the_key(monkeypatch, caplog):
    import service.http.server as server

    monkeypatch.setattr(server, "serve", lambda settings, **kwargs: 0)  # stop before uvicorn
    caplog.set_level(logging.INFO, logger="vitserve.auth")
    assert main(["serve", "--api-key", "k-very-secret", "--port", "0"]) == 0
    assert main(["serve", "--port", "0"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "vitserve.auth"]
    assert lines[0].startswith("authentication on") and lines[1].startswith("authentication OFF"), lines
    assert "k-very-secret" not in caplog.text


def test_401s_are_logged_with_a_reason_and_without_the_presented_key(make_fake_engine, encode_photo, caplog):
    app = create_app(Settings(api_key="s3cret-key"), engine=make_fake_engine())
    caplog.set_level(logging.WARNING, logger="vitserve.auth")
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Basic s3cret-kex"}, {"Authorization": "Bearer s3cret-kez"}):
            assert client.get("/v1/models", headers=headers).status_code == 401
    reasons = [r.getMessage() for r in caplog.records if r.name == "vitserve.auth"]
    assert [m.rsplit(": ", 1)[1] for m in reasons] == ["no Authorization header", "not a Bearer token", "wrong key"]
    assert all(m.startswith("401 GET /v1/models from ") for m in reasons)
    assert "s3cret" not in caplog.text


def test_every_setting_is_a_serve_flag():
    serve = subcommand_parser(build_parser(), "serve")
    by_flag = {flag: action.dest for action in serve._actions for flag in action.option_strings}
    for name in Settings.model_fields:
        assert by_flag.get(settings_flag(name)) == name, f"Settings.{name} has no `vitserve serve` flag"
    assert settings_flag("model_name") == "--name"


def test_flags_once_refused_now_reach_the_settings():
    args = build_parser().parse_args(
        [
            "serve",
            "--max-top-k",
            "7",
            "--jpeg-draft",
            "false",
            "--trt-fp16",
            "false",
            "--api-key",
            "k",
            "--job-batch-size",
            "3",
            "--max-archive-ratio",
            "50",
            "--ort-allow-spinning",
            "--name",
            "digits-ft",
        ]
    )
    s = build_settings(args)
    assert (s.max_top_k, s.jpeg_draft, s.trt_fp16, s.api_key) == (7, False, False, "k")
    assert (s.job_batch_size, s.max_archive_ratio, s.ort_allow_spinning, s.model_name) == (3, 50.0, True, "digits-ft")


def test_an_unknown_serve_flag_prints_serves_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--bad"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vitserve serve") and "--max-batch-size" in err
    assert "error: unrecognized arguments: --bad" in err


def test_the_served_name_comes_from_name_then_a_sidecar_then_the_architecture(tmp_path):
    def served(model: Path, **settings) -> str:
        spec_options = Settings(model=model, **settings).spec_options()
        return Engine(model, spec_options=spec_options, providers="cpu", log_placement=False).metadata.served_name

    model = tmp_path / "digits.onnx"
    shutil.copy(DEFAULT_MODEL_PATH, model)
    architecture = Engine(model, providers="cpu", log_placement=False).metadata.architecture
    assert served(model) == architecture
    (tmp_path / "digits.onnx.json").write_text('{"name": "digits-from-sidecar"}')
    assert served(model) == "digits-from-sidecar"  # our metadata's architecture is no name claim
    assert served(model, model_name="digits-ft") == "digits-ft"


def test_export_from_onnx_writes_the_name_the_copy_is_served_under(tmp_path, capsys):
    out = tmp_path / "named.onnx"
    assert main(["export", "--from-onnx", str(DEFAULT_MODEL_PATH), "-o", str(out), "--name", "digits-ft"]) == 0
    engine = Engine(out, providers="cpu", log_placement=False)
    assert engine.metadata.served_name == "digits-ft" and engine.metadata.architecture != "digits-ft"


def test_a_busy_port_is_one_line_and_a_non_zero_exit():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")}
        env["PYTHONPATH"] = str(REPO)
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"vitserve serve: port {port} is in use (on 127.0.0.1); stop what holds it, "
        "or pick another with --port / VITSERVE_PORT"
    ]
