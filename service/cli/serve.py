"""`vitserve serve`: run the HTTP service with uvicorn.

Every Settings field is a flag here, built from the class itself (service/core/settings.py), so the
flags and the VITSERVE_* variables can never drift apart. Flags override the variables, which
override the defaults.
SIGTERM / Ctrl-C drains: the service keeps listening but answers new requests and /readyz with
503 (so a load balancer takes it out of rotation), finishes every request already accepted,
then exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import sys
import typing
from functools import partial
from pathlib import Path
from typing import Any

from service.cli.spec_flags import GROUP_TITLE
from service.core.settings import DEFAULT_MODEL_PATH, Settings, env_name
from service.core.spec import SPEC_FIELDS, flag_name

EXIT_BAD_SETTINGS = 2
EXIT_NOT_STARTED = 1


def settings_flags(field_name: str) -> list[str]:
    """The flags of one Settings field: ``--max-batch-size``, or those the field names (``--name``, ...)."""
    extra = Settings.model_fields[field_name].json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("flags"), list):
        return [str(flag) for flag in extra["flags"]]
    return [flag_name(field_name)]


def settings_flag(field_name: str) -> str:
    """The flag a message names for one Settings field."""
    return settings_flags(field_name)[0]


def _metavar(annotation: Any) -> str:
    """A short placeholder by type: --max-batch-size N, --model PATH, --log-level {debug,...}."""
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
    if choices:
        return "{" + ",".join(choices) + "}"
    kinds = {t for t in (*typing.get_args(annotation), annotation) if t is not type(None)}
    for kind, metavar in ((bool, "BOOL"), (int, "N"), (float, "X"), (Path, "PATH")):
        if kind in kinds:
            return metavar
    return "TEXT"


def _default_text(value: Any) -> str:
    if value is None or value == "":
        return ""
    if value == DEFAULT_MODEL_PATH:
        return ", default: the bundled demo model"
    return f", default {str(value).lower() if isinstance(value, bool) else value}"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an exported ONNX model over HTTP",
        description="Serve an exported ONNX ViT over HTTP (/v1 JSON API, KServe v2, /metrics, web page). "
        "Every flag can also be set as VITSERVE_<NAME> in the environment; a flag wins.",
    )
    description = parser.add_argument_group(GROUP_TITLE)
    for name, field in Settings.model_fields.items():
        group = description if name in SPEC_FIELDS else parser
        help_text = f"{field.description or name} [{env_name(name)}{_default_text(field.default)}]"
        metavar = _metavar(field.annotation)
        if field.annotation is bool:
            # `--cuda-graphs` alone means true; `--cuda-graphs false` turns it off.
            group.add_argument(
                *settings_flags(name), dest=name, nargs="?", const="true", default=None, metavar=metavar, help=help_text
            )
        else:
            group.add_argument(*settings_flags(name), dest=name, default=None, metavar=metavar, help=help_text)
    parser.set_defaults(func=run)


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the flags given on top (strings: pydantic checks them)."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**overrides)


def describe_errors(exc) -> str:
    """A pydantic ValidationError as one line naming each setting by its flag and variable."""
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        where = f"{settings_flag(loc[0])} / {env_name(loc[0])}" if loc and loc[0] in Settings.model_fields else ""
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def run(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    from service.core.logs import configure_logging
    from service.core.settings import UnknownVariables

    try:
        settings = build_settings(args)
    except UnknownVariables as exc:
        print(f"vitserve serve: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    except ValidationError as exc:
        print(f"vitserve serve: invalid settings: {describe_errors(exc)}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    from service.core.repository import RepositoryError, scan_repository

    try:
        if settings.model_repository is None:
            settings.check_model_file()
        else:
            scan_repository(settings.model_repository)  # unreadable: one line now, not a lifespan traceback
    except (FileNotFoundError, RepositoryError) as exc:
        print(f"vitserve serve: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS

    from service.http.server import CannotListen, bind_listener

    # Take the port before loading the model: a busy port is one line, not a model load and a
    # lifespan that starts and shuts down around uvicorn's bind error.
    try:
        listener = bind_listener(settings.host, settings.port)
    except CannotListen as exc:
        print(f"vitserve serve: {exc}", file=sys.stderr)
        return EXIT_NOT_STARTED
    configure_logging(settings.log_level, settings.log_format)
    announce_auth = partial(logging.getLogger("vitserve.auth").info, settings.auth_description())

    from service.http.server import serve
    from service.runtime.engine import EngineError
    from service.serving.lifecycle import build_engine
    from service.serving.supervisor import resolve_workers

    if resolve_workers(settings) > 1 or settings.model_repository is not None:
        # The engine process, or the service itself for a repository, loads the models (a bad one: exit 2).
        announce_auth()
        return serve(settings, listener=listener)
    # Load the model before uvicorn starts: a file that cannot be served (missing labels, a 3-D
    # input, ...) is one clear line and exit code 2, not a lifespan traceback.
    try:
        engine = build_engine(settings)
    except EngineError as exc:
        listener.close()
        print(f"vitserve serve: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    announce_auth()  # after the model loaded: a file that cannot be served is the only line
    return serve(settings, engine=engine, listener=listener)
