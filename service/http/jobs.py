"""/v1/jobs: scoring jobs too big for one request (archives and manifests), run in the background.

POST answers 202 with the job id as soon as the input is stored and checked; the images are
scored by the service's JobRunner (service/scoring/job_runner.py) at low priority. Results are read
back as JSON lines (default) or CSV (``Accept: text/csv``), streamed page by page from the store.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from service.core.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    StorageFull,
    UnsupportedMediaType,
    is_storage_full,
)
from service.core.image_files import describe_suffixes
from service.core.settings import Settings
from service.http.deps import media_type as request_media_type
from service.http.deps import service_state
from service.http.json_body import JsonBounds, parse_json
from service.scoring.job_runner import job_dir
from service.scoring.job_store import CANCELLED, JobRecord
from service.scoring.jobs_control import JobsControl
from service.scoring.rows import csv_fields, csv_header
from service.scoring.sources import (
    ArchiveLimits,
    Forbidden,
    archive_kind,
    extract_archive,
    manifest_paths,
    resolve_under_root,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ARCHIVE_TYPES = frozenset(
    {
        "application/zip",
        "application/x-zip-compressed",
        "application/x-tar",
        "application/gzip",
        "application/x-gzip",
        "application/x-gtar",
        "application/x-bzip2",
        "application/x-xz",
        "application/octet-stream",
    }
)
MANIFEST_TYPES = frozenset(
    {"application/x-ndjson", "application/jsonl", "application/json-lines", "application/x-jsonlines", "text/plain"}
)
_RESULTS_PAGE = 1000
_WRITE_CHUNK = 1 << 20  # upload bytes gathered before each write (done in a worker thread)


def _runner(request: Request) -> JobsControl:
    return service_state(request).jobs


def _limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(
        max_members=settings.max_job_images,
        max_member_bytes=settings.max_image_file_bytes,
        max_total_bytes=settings.max_archive_bytes,
        max_ratio=settings.max_archive_ratio,
        max_entries=settings.max_archive_entries,
    )


def _input_kind(request: Request, settings: Settings) -> str:
    """ "archive", "multipart", "lines" or "json", refusing what is not allowed before the body is read."""
    media_type = request_media_type(request)
    if media_type in ARCHIVE_TYPES:
        return "archive"
    if media_type == "multipart/form-data":
        return "multipart"
    if media_type not in MANIFEST_TYPES and media_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type {media_type or '(none)'!r} is not supported; send a zip or tar "
            "(application/zip, application/x-tar, application/gzip), a manifest "
            '(application/x-ndjson), JSON {"paths": [...]}, or multipart/form-data'
        )
    _check_manifests_allowed(settings)
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > settings.max_manifest_bytes:
        raise _manifest_too_large(settings, int(declared))
    return "json" if media_type == "application/json" else "lines"


def _check_manifests_allowed(settings: Settings) -> None:
    if settings.job_root is None:
        raise Forbidden("manifest jobs are disabled on this server (VITSERVE_JOB_ROOT is not set)")


def _manifest_too_large(settings: Settings, size: int | None = None) -> PayloadTooLarge:
    what = f"of {size} bytes " if size is not None else ""
    return PayloadTooLarge(
        f"manifest {what}is over the limit of {settings.max_manifest_bytes} bytes (max_manifest_bytes)"
    )


async def _read_capped(request: Request, limit: int, settings: Settings) -> bytes:
    """The body, refused as soon as it passes ``limit`` bytes (a manifest never gets the upload limit)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _manifest_too_large(settings)
        chunks.append(chunk)
    return b"".join(chunks)


async def _save_body(request: Request, target: Path) -> None:
    """Stream the body to ``target`` (the middleware stops it at max_job_upload_bytes); writes off the loop."""
    pending, size = [], 0
    with open(target, "wb") as out:
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if size >= _WRITE_CHUNK:
                await asyncio.to_thread(out.write, b"".join(pending))
                pending, size = [], 0
        if pending:
            await asyncio.to_thread(out.write, b"".join(pending))


def _archive_items(upload: Path, dest: Path, limits: ArchiveLimits) -> tuple[str, list[tuple[str, str]]]:
    kind = archive_kind(upload)
    if kind is None:
        raise BadRequest("the upload is not a zip or tar archive (plain, .gz, .bz2 or .xz)")
    names = extract_archive(upload, dest, limits)
    upload.unlink()
    return kind, [(name, str(dest.joinpath(*name.split("/")))) for name in names]


def _manifest_items(body: bytes, kind: str, settings: Settings) -> list[tuple[str, str]]:
    """(path, where it is) per manifest line or JSON path: parsed and checked in a worker thread."""
    root = settings.job_root
    assert root is not None  # _check_manifests_allowed ran first
    if kind == "json":
        bounds = JsonBounds(max_objects=4096, max_arrays=4096, max_values=settings.max_job_images + 16)
        document = parse_json(body, bounds, "JSON manifest")
        if not isinstance(document, dict) or not isinstance(document.get("paths"), list):
            raise BadRequest('JSON body must be {"paths": ["relative/or/absolute/path.jpg", ...]}')
        paths = manifest_paths(json.dumps(p) for p in document["paths"])
    else:
        paths = manifest_paths(body.splitlines())
    if len(paths) > settings.max_job_images:
        raise PayloadTooLarge(
            f"manifest lists {len(paths)} images; the limit is {settings.max_job_images} (max_job_images)"
        )
    return [(path, str(resolve_under_root(path, root))) for path in paths]


async def _read_input(
    request: Request, settings: Settings, kind: str, workdir: Path
) -> tuple[str, list[tuple[str, str]]]:
    """The request's images as (kind, [(reported path, file on this host)])."""
    if kind in ("lines", "json"):
        body = await _read_capped(request, settings.max_manifest_bytes, settings)
        return "manifest", await asyncio.to_thread(_manifest_items, body, kind, settings)
    await asyncio.to_thread(workdir.mkdir, parents=True)
    upload = workdir / "upload"
    if kind == "archive":
        await _save_body(request, upload)
        return await asyncio.to_thread(_archive_items, upload, workdir / "files", _limits(settings))
    form = await request.form(max_files=1, max_fields=8)
    try:
        field = form.get("file") or form.get("manifest")
        if not isinstance(field, UploadFile):
            raise BadRequest("multipart body needs a file field 'file' (a zip or tar) or 'manifest' (JSON lines)")
        if "manifest" in form:
            _check_manifests_allowed(settings)
            if field.size is not None and field.size > settings.max_manifest_bytes:
                raise _manifest_too_large(settings, field.size)
            body = await field.read(settings.max_manifest_bytes + 1)
            if len(body) > settings.max_manifest_bytes:
                raise _manifest_too_large(settings)
            return "manifest", await asyncio.to_thread(_manifest_items, body, "lines", settings)
        with open(upload, "wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, field.file, out, _WRITE_CHUNK)
    finally:
        await form.close()
    return await asyncio.to_thread(_archive_items, upload, workdir / "files", _limits(settings))


def _describe(runner: JobsControl, job: JobRecord) -> dict[str, Any]:
    rate = runner.images_per_second(job)
    return {
        "id": job.id,
        "state": job.state,
        "kind": job.kind,
        "model": job.model,
        "top_k": job.top_k,
        "total": job.total,
        "done": job.processed,
        "scored": job.scored,
        "failed": job.failed,
        "images_per_second": round(rate, 2) if rate is not None else None,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error,
        "paused": runner.paused.get(job.id),  # why it waits (e.g. storage full), while it does
        "results": f"/v1/jobs/{job.id}/results",
    }


async def _job_or_404(runner: JobsControl, job_id: str) -> JobRecord:
    job = await asyncio.to_thread(runner.store.get_job, job_id) if runner.db_path.exists() else None
    if job is None:
        raise NotFound(f"no job with id {job_id!r}")
    return job


@router.post(
    "",
    status_code=202,
    summary="Start a scoring job",
    description="Body: a zip or tar of images (raw, or multipart field `file`), a manifest of paths under the "
    'server\'s VITSERVE_JOB_ROOT (JSON lines, multipart field `manifest`, or JSON `{"paths": [...]}`). '
    "Answers 202 with the job at once; poll GET /v1/jobs/{id}, then read /v1/jobs/{id}/results.",
)
async def create_job(
    request: Request,
    top_k: int = Query(5, description="classes per image in the results"),
    model: str | None = Query(None, description="model to score with; default: the default model"),
    version: int | None = Query(None, ge=1, description="its version; default: the one serving now"),
):
    state = service_state(request)
    settings = state.settings
    # The job is pinned to the version serving now: a later swap does not change its answers.
    lane = state.models.resolve(model, version)
    if not 1 <= top_k <= settings.max_top_k:
        raise BadRequest(f"top_k must be between 1 and {settings.max_top_k}, got {top_k}")
    kind = _input_kind(request, settings)  # 415 / 403 / 413 before a byte of the body is read
    runner = _runner(request)
    job_id = uuid.uuid4().hex
    workdir = job_dir(settings, job_id)
    try:
        source, items = await _read_input(request, settings, kind, workdir)
        if not items:
            raise BadRequest(f"the job has no images (image files end in {describe_suffixes()})")
        if len(items) > settings.max_job_images:
            raise PayloadTooLarge(f"{len(items)} images; the limit is {settings.max_job_images}")
        job = await asyncio.to_thread(
            runner.store.create_job,
            job_id,
            kind=source,
            top_k=min(top_k, lane.metadata.num_classes),
            model=lane.name,
            model_version=lane.version,
            items=items,
        )
    except OSError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        if is_storage_full(exc):
            raise StorageFull(
                "the disk is full: the upload could not be stored; retry later", retry_after_s=30
            ) from None
        raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    runner.notify()
    return JSONResponse(_describe(runner, job), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("/{job_id}", summary="A job's state, progress (done/total), failures and throughput")
async def get_job(request: Request, job_id: str) -> dict:
    runner = _runner(request)
    return _describe(runner, await _job_or_404(runner, job_id))


@router.delete("/{job_id}", summary="Cancel a job (results so far stay readable)")
async def cancel_job(request: Request, job_id: str) -> dict:
    runner = _runner(request)
    job = await _job_or_404(runner, job_id)
    if not job.finished and await asyncio.to_thread(runner.store.finish, job_id, CANCELLED):
        runner.cancel(job_id)
    return _describe(runner, await _job_or_404(runner, job_id))


@router.get(
    "/{job_id}/results",
    summary="The job's results so far, in submission order",
    description='JSON lines `{"path", "labels", "scores"}` or `{"path", "error": {"code", "message"}}`; '
    "CSV with `Accept: text/csv` (path, label_1, score_1, ..., error_code, error). Images not scored "
    "yet are absent; the X-Job-State header says whether more will come.",
    # Document what is really sent (FastAPI would otherwise promise application/json).
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "one result row per line",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        }
    },
)
async def job_results(request: Request, job_id: str):
    runner = _runner(request)
    job = await _job_or_404(runner, job_id)
    as_csv = "text/csv" in request.headers.get("accept", "").lower()
    store = runner.store

    async def pages() -> AsyncIterator[list[tuple[int, str]]]:
        after = -1
        while True:
            page = await asyncio.to_thread(store.results, job_id, after, _RESULTS_PAGE)
            if not page:
                return
            yield page
            after = page[-1][0]

    async def jsonl() -> AsyncIterator[bytes]:
        async for page in pages():
            yield "".join(f"{row}\n" for _, row in page).encode()

    async def csv_rows() -> AsyncIterator[bytes]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(csv_header(job.top_k))
        async for page in pages():
            for _, row in page:
                writer.writerow(csv_fields(json.loads(row), job.top_k))
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
        if buffer.tell():
            yield buffer.getvalue().encode()

    headers = {"X-Job-State": job.state, "X-Job-Total": str(job.total)}
    if as_csv:
        return StreamingResponse(csv_rows(), media_type="text/csv; charset=utf-8", headers=headers)
    return StreamingResponse(jsonl(), media_type="application/x-ndjson", headers=headers)
