"""Triton's model-repository extension of the Open Inference Protocol, over HTTP.

    POST /v2/repository/index                       every model version: name, version, state, reason
    POST /v2/repository/models/{name}/load          (re)read the model's folder and bring up its versions
    POST /v2/repository/models/{name}/unload        take the model out of service

tritonclient's ``get_model_repository_index``, ``load_model`` and ``unload_model`` call these. Load
and unload change what the server serves: as in Triton, they are refused (403) unless the server
runs with ``--model-control explicit``; the index is always readable.
A load swaps versions without downtime (service/serving/registry.py): a new version takes traffic
only once it is warm and has passed its golden check. An unload is refused (409) while requests
hold the model, unless the body says ``{"parameters": {"force": true}}``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from service.core.errors import BadRequest, ServiceError
from service.core.repository import check_name
from service.http.deps import State
from service.http.json_body import JsonBounds, parse_json
from service.serving.lifecycle import repository_scanner
from service.serving.state import ServiceState

router = APIRouter(prefix="/v2/repository", tags=["Open Inference Protocol (KServe v2)"])


# A repository request is a small JSON object; a body nested or repeated past this is no such request.
_BOUNDS = JsonBounds(max_objects=64, max_arrays=64, max_values=1024)


async def _json_object(request: Request, example: str) -> dict[str, object]:
    """The request's JSON object body ({} when empty), parsed within bounds: 400/413 naming the problem."""
    body = await request.body()
    if not body.strip():
        return {}
    parsed = parse_json(body, _BOUNDS, "request body")
    if not isinstance(parsed, dict):
        raise BadRequest(f"the body must be a JSON object such as {example}")
    return parsed


async def _parameters(request: Request) -> dict[str, object]:
    parameters = (await _json_object(request, '{"parameters": {"force": true}}')).get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be an object")
    return parameters


@router.post("/index", summary="Every model version in the repository, with its state")
async def repository_index(request: Request, state: State) -> list[dict[str, object]]:
    ready_only = bool((await _json_object(request, '{"ready": true}')).get("ready", False))
    out: list[dict[str, object]] = []
    for status in state.models.statuses():
        if ready_only and status.state.value != "READY":
            continue
        entry: dict[str, object] = {"name": status.name, "version": str(status.version), "state": status.state.value}
        if status.reason:
            entry["reason"] = status.reason
        out.append(entry)
    return out


@router.post("/models/{model_name}/load", summary="Load (or reload) a model's versions from the repository")
async def load_model(request: Request, state: State, model_name: str) -> dict[str, object]:
    _check_control(state)
    await _parameters(request)  # validated; a config override is not supported (the folder is the config)
    _check_name(model_name)
    scan = repository_scanner(state.settings)
    if scan is None:
        if model_name in state.models.current:
            return {}  # the one file this server was started with: loaded already
        raise BadRequest(
            "this server serves one model file (--model); start it with --model-repository DIR to load models"
        )
    repository = await asyncio.to_thread(scan)
    await state.models.load(model_name, repository)
    return {}


@router.post("/models/{model_name}/unload", summary="Unload a model (refused while in use unless forced)")
async def unload_model(request: Request, state: State, model_name: str) -> dict[str, object]:
    _check_control(state)
    parameters = await _parameters(request)
    _check_name(model_name)
    await state.models.unload(model_name, force=bool(parameters.get("force", False)))
    return {}


class ModelControlOff(ServiceError):
    status_code = 403
    code = "model_control_off"


def _check_control(state: ServiceState) -> None:
    if state.settings.model_control != "explicit":
        raise ModelControlOff(
            "loading and unloading models is off on this server; start it with --model-control explicit "
            "(VITSERVE_MODEL_CONTROL=explicit) to allow it"
        )


def _check_name(name: str) -> None:
    try:
        check_name(name)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
