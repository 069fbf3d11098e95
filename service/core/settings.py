"""All service configuration in one place: environment variables VITSERVE_*, validated at start-up.

Every field's unit is in its name, and every field is also a `vitserve serve --<name>` flag
(service/cli/serve.py builds them from this class). A VITSERVE_* variable that names no setting
stops start-up (``UnknownVariables``) instead of being ignored. ``get_settings()`` is cached so the
app, the CLI and tests share one object; tests build their own ``Settings(...)`` and hand it to
``create_app``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.gpu_config import GpuOptions, GpuOptionsError, parse_buckets
from service.core.image_formats import DEFAULT_FORMATS, SUPPORTED_FORMATS, parse_formats
from service.core.limits import DEFAULT_MAX_IMAGE_PIXELS
from service.core.spec import SPEC_FIELDS, ModelSpecError, SpecOptions, options_from_values

# The bundled demo model (trained and exported by model/; lives in the repository).
DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[2] / "models" / "digits" / "model.onnx"
ENV_PREFIX = "VITSERVE_"
# VITSERVE_* variables that are not settings of the service: docker-compose.yml substitutes them on
# the host, the container's health check, the container and GPU tests and bench/gpu.sh read them.
TOOL_VARIABLES = frozenset(
    {
        "VITSERVE_IMAGE",
        "VITSERVE_SOURCE",
        "VITSERVE_PUBLISH",
        "VITSERVE_GPU",
        "VITSERVE_MODELS_DIR",
        "VITSERVE_HEALTHCHECK_TIMEOUT_S",
        "VITSERVE_DOCKER_CUDA_EXTRAS",
        "VITSERVE_GPU_MODELS",
        "VITSERVE_GPU_REPORT_DIR",
    }
)


class UnknownVariables(ValueError):
    """VITSERVE_* variables that name no setting (a typo would otherwise be ignored silently)."""


def env_name(field_name: str) -> str:
    """``max_batch_size`` -> ``VITSERVE_MAX_BATCH_SIZE``."""
    return ENV_PREFIX + field_name.upper()


def check_environment(environ: Mapping[str, str]) -> None:
    """Raise UnknownVariables naming every unknown VITSERVE_* variable and the closest known names."""
    known = [env_name(name) for name in Settings.model_fields]
    # pydantic-settings matches names case-insensitively, so the check does too.
    unknown = sorted(
        k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in {*known, *TOOL_VARIABLES}
    )
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), known, n=2, cutoff=0.6)
        parts.append(f"{name} (did you mean {' or '.join(close)}?)" if close else name)
    raise UnknownVariables(
        f"unknown environment variable(s) {', '.join(parts)}; `vitserve serve --help` lists every setting"
    )


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


class Settings(BaseSettings):
    """Service settings; each can be set as VITSERVE_<NAME> (e.g. VITSERVE_MAX_BATCH_SIZE=16).

    Constructing one checks the environment first (``check_environment``).
    """

    # extra="ignore" is for keyword arguments only; unknown variables are refused by check_environment.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=None, extra="ignore", validate_default=True, protected_namespaces=()
    )

    def __init__(self, **values: Any) -> None:
        check_environment(os.environ)
        super().__init__(**values)

    model: Path = Field(DEFAULT_MODEL_PATH, description="path of the exported .onnx model to serve")
    # Flag --name first (--model-name also works): `vitserve export --model-name` means the checkpoint's variant.
    model_name: str | None = Field(
        None,
        description="the name clients use for the --model file (/v1 'model', the v2 model name); "
        "default: the name in its metadata or sidecar, else its architecture",
        json_schema_extra={"flags": ["--name", "--model-name"]},
    )
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")

    # Batching: CPU inference is compute-bound (batches beyond ~8 add latency, not throughput);
    # GPU hosts want larger batches: left unset, the app uses 32 there (service.http.app.GPU_DEFAULT_MAX_BATCH_SIZE).
    max_batch_size: int = Field(8, ge=1, le=1024, description="most images per engine run")
    max_queue_delay_ms: float = Field(2.0, ge=0, le=10_000, description="longest a request waits for a batch to fill")
    max_queue_size: int = Field(256, ge=1, le=1_000_000, description="queued images before answering 429")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="deadline per request, queue + inference")

    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest request body, bytes")
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, ge=1, description="largest decoded image, width x height pixels"
    )
    max_batch_images: int = Field(64, ge=1, le=10_000, description="most images in one /v1/classify/batch call")
    image_formats: str = Field(
        ",".join(DEFAULT_FORMATS),
        description="comma list of image formats decoded (any other is refused before its decoder runs); "
        f"allowed: {', '.join(SUPPORTED_FORMATS)}",
    )
    max_request_pixels: int = Field(
        0, ge=0, description="most pixels all images of one request may decode together; 0 = 4 x max_image_pixels"
    )
    max_request_decodes: int = Field(
        0, ge=0, le=256, description="most images of one request decoding at once; 0 = half the preprocess threads"
    )
    max_decoding_pixels: int = Field(
        0,
        ge=0,
        description="most pixels being decoded at once in the process (bounds memory); 0 = 2 x max_image_pixels",
    )
    max_top_k: int = Field(100, ge=1, description="largest top_k a client may ask for")

    jpeg_draft: bool = Field(
        True,
        description="decode large JPEGs (short side >= 4x the model's resize size) "
        "in DCT draft mode; false = exact parity with timm for every size",
    )
    preprocess_threads: int = Field(0, ge=0, le=256, description="decode/resize threads; 0 = one per core")
    intra_op_threads: int = Field(0, ge=0, le=1024, description="ONNX Runtime threads per operator; 0 = one per core")
    ort_allow_spinning: bool = Field(False, description="let idle ONNX Runtime threads spin (GPU/large hosts)")
    providers: str = Field("", description="comma list overriding provider order, e.g. 'cuda,cpu'; empty = automatic")
    warmup_batch_sizes: str = Field(
        "", description="comma list of batch sizes to warm up; empty = 1 and max_batch_size"
    )

    # GPU engine options (service/runtime/gpu_options.py). All off: each stays off until bench/engine.py on
    # a GPU shows it pays (bench/README.md). batch_buckets works on any provider, the rest on CUDA/TensorRT.
    batch_buckets: str = Field(
        "",
        description="comma list of batch sizes every run is padded to and warmed at, "
        "e.g. 1,4,16,64; empty = each batch runs at its own size",
    )
    cuda_graphs: bool = Field(False, description="capture one CUDA graph per batch bucket (needs batch_buckets; CUDA)")
    pinned_host_memory: bool = Field(False, description="stage uploads in page-locked host memory (CUDA)")
    trt_cache_dir: Path | None = Field(None, description="TensorRT engine and timing cache directory; unset = none")
    trt_fp16: bool = Field(True, description="let TensorRT use fp16 kernels (matters for fp32 exports)")

    # Processes (service/serving/supervisor.py): N front-end processes (HTTP, limits, decoding) share
    # the listening socket and feed ONE engine process through shared memory. 1 = everything in one
    # process; 0 = automatic (service/serving/supervisor.py: automatic_workers, chosen by bench/serve.py).
    workers: int = Field(1, ge=0, le=256, description="front-end processes; 1 = one process, 0 = automatic")
    # Slow clients (service/http/slow_clients.py): a client dribbling bytes cannot hold a connection.
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="grace for a request body, extended by one second per min_body_rate bytes"
    )
    min_body_rate_bytes_per_s: int = Field(
        4096, ge=1, description="slowest average upload speed accepted once body_timeout_s has passed"
    )
    # Connections (service/http/connection.py): what one client may hold before its request is read.
    max_connections: int = Field(
        1000, ge=1, le=1_000_000, description="open client connections; the next one is answered 503 and closed"
    )
    max_request_head_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * 1024 * 1024, description="request line and headers of one request, bytes (431)"
    )
    request_head_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="time to send a complete request head, from connect or the last answer (408)"
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, le=3600, description="an idle kept-alive connection is closed after this"
    )

    api_key: str | None = Field(
        None,
        description="every route but the probes, /metrics and the page needs 'Authorization: Bearer <key>' "
        "(prefer the variable: a flag shows in ps)",
    )
    no_auth: bool = Field(
        False,
        description="serve without authentication on a non-loopback host (without an API key, "
        "only 127.0.0.1/::1 are allowed otherwise)",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="how much is logged; info has one access-log line per request"
    )
    log_format: Literal["text", "json"] = Field("text", description="log lines as text, or as JSON objects")
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="SIGTERM to exit, at most (one deadline for the whole drain); keep it 5 s or more under the "
        "orchestrator's grace (compose: stop_grace_period 40s)",
    )
    cors_origins: str = Field(
        "",
        description="comma list of origins whose browser pages may call the API (https://app.example.com), "
        "or *; empty = CORS off",
    )

    # Batch-scoring jobs (service/scoring/, /v1/jobs). The database is created on the first job.
    data_dir: Path = Field(Path("vitserve-data"), description="directory of the jobs database and job uploads")
    job_root: Path | None = Field(
        None, description="manifest jobs may only name files under this directory; unset = manifest jobs refused (403)"
    )
    max_job_upload_bytes: int = Field(4 * 1024**3, ge=1024, description="largest archive upload to /v1/jobs, bytes")
    max_job_images: int = Field(1_000_000, ge=1, description="most images in one job")
    max_manifest_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest manifest (JSON lines or JSON paths) sent to /v1/jobs, bytes"
    )
    max_archive_entries: int = Field(
        50_000, ge=1, description="most entries (files, folders, skipped files) in one uploaded archive"
    )
    max_archive_bytes: int = Field(16 * 1024**3, ge=1024, description="most bytes one archive may extract to")
    max_archive_ratio: float = Field(100.0, ge=1, description="most uncompressed bytes per archive byte (zip bombs)")
    max_image_file_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest single image file in a job")
    job_decode_threads: int = Field(0, ge=0, le=256, description="job decode threads; 0 = half the cores (min 1)")
    job_max_in_flight: int = Field(
        0, ge=0, le=100_000, description="job images decoded or queued at once; 0 = 2 x max_batch_size"
    )
    job_batch_size: int = Field(
        0,
        ge=0,
        le=1024,
        description="most images in one job batch (an online request may wait behind one); 0 = max_batch_size / 4",
    )
    low_priority_idle_ms: float = Field(
        20.0, ge=0, le=10_000, description="online lane quiet time before a job batch may run"
    )

    # Many models and versions (service/core/repository.py, service/serving/registry.py).
    model_repository: Path | None = Field(
        None, description="serve DIR/<name>/<version>/model.onnx instead of the one --model file"
    )
    default_model: str | None = Field(
        None, description="model that /v1/classify serves in a repository; unset = the only one, or the first by name"
    )
    model_control: Literal["none", "explicit"] = Field(
        "none",
        description="explicit = the repository extension's load/unload calls may change what is served; "
        "none = they are refused (403), as in Triton's default mode",
    )
    repository_poll_s: float = Field(
        0.0, ge=0, le=86_400, description="re-scan the repository for new versions this often; 0 = only on load calls"
    )
    model_memory_budget_bytes: int = Field(
        0, ge=0, description="most bytes of model weights loaded at once; 0 = host memory is the only bound"
    )
    cache_entries: int = Field(
        0, ge=0, le=10_000_000, description="results kept in the per-process response cache; 0 = no cache"
    )

    # Model description for ONNX files without vitserve metadata (service/core/spec/): each
    # overrides the file's metadata and its <model>.json sidecar. Strings, parsed in one place there.
    image_size: int | None = Field(None, ge=1, description=SPEC_FIELDS["image_size"])
    resize: int | None = Field(None, ge=1, description=SPEC_FIELDS["resize"])
    resize_mode: str | None = Field(None, description=SPEC_FIELDS["resize_mode"])
    crop: float | None = Field(None, gt=0, le=1, description=SPEC_FIELDS["crop"])
    interpolation: str | None = Field(None, description=SPEC_FIELDS["interpolation"])
    mean: str | None = Field(None, description=SPEC_FIELDS["mean"])
    std: str | None = Field(None, description=SPEC_FIELDS["std"])
    labels: Path | None = Field(None, description=SPEC_FIELDS["labels"])
    input_name: str | None = Field(None, description=SPEC_FIELDS["input_name"])
    output_name: str | None = Field(None, description=SPEC_FIELDS["output_name"])
    input_layout: str | None = Field(None, description=SPEC_FIELDS["input_layout"])

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("job_root", "model_repository", "model_name", "default_model", mode="before")
    @classmethod
    def _empty_root_is_none(cls, value: object) -> object:
        # VITSERVE_JOB_ROOT="" must mean "no root", never Path("") == the current directory (and so on).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key", mode="after")
    @classmethod
    def _key_not_empty(cls, value: str | None) -> str | None:
        # docker-compose's ${VITSERVE_API_KEY:-} passes "" when the key is not exported: that must
        # not turn authentication off without a word.
        if value is not None and not value.strip():
            raise ValueError(
                "the API key is empty; give a key, or leave VITSERVE_API_KEY unset "
                "(and pass --no-auth / VITSERVE_NO_AUTH=true off loopback) to serve without authentication"
            )
        return value

    @field_validator(*SPEC_FIELDS, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("trt_cache_dir", mode="before")
    @classmethod
    def _empty_cache_dir_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model", mode="after")
    @classmethod
    def _expand_model(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("providers", mode="after")
    @classmethod
    def _check_providers(cls, value: str) -> str:
        allowed = {
            "tensorrt",
            "trt",
            "cuda",
            "cpu",
            "tensorrtexecutionprovider",
            "cudaexecutionprovider",
            "cpuexecutionprovider",
        }
        names = [v.strip() for v in value.split(",") if v.strip()]
        bad = [n for n in names if n.lower() not in allowed]
        if bad:
            raise ValueError(f"unknown provider(s) {bad}; use a comma list of tensorrt, cuda, cpu")
        return ",".join(names)

    @field_validator("image_formats", mode="after")
    @classmethod
    def _check_formats(cls, value: str) -> str:
        return ",".join(parse_formats(value))

    @field_validator("warmup_batch_sizes", mode="after")
    @classmethod
    def _check_warmup(cls, value: str) -> str:
        for part in filter(None, (v.strip() for v in value.split(","))):
            if not (part.isascii() and part.isdigit()) or int(part) < 1:
                raise ValueError(f"warmup_batch_sizes must be a comma list of positive integers, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        for name in ("max_request_pixels", "max_decoding_pixels"):
            if 0 < getattr(self, name) < self.max_image_pixels:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be 0 or >= max_image_pixels ({self.max_image_pixels})"
                )
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) must be >= max_batch_size ({self.max_batch_size})"
            )
        try:
            self.spec_options()  # a bad --mean or an unreadable labels file fails here, at start-up
        except ModelSpecError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        if self.api_key is not None and self.no_auth:
            raise ValueError("an API key and no_auth contradict each other; give one of them")
        if self.api_key is None and not self.no_auth and not is_loopback(self.host):
            raise ValueError(
                f"listening on {self.host} with no API key: set VITSERVE_API_KEY, or choose to serve "
                "without authentication with --no-auth (VITSERVE_NO_AUTH=true)"
            )
        return self

    def auth_description(self) -> str:
        """One line for the start-up log: whether requests need the key (never the key itself)."""
        if self.api_key is not None:
            return "authentication on: API routes need 'Authorization: Bearer <key>'"
        reason = "--no-auth" if self.no_auth else f"no API key, listening on loopback {self.host} only"
        return f"authentication OFF ({reason})"

    @model_validator(mode="after")
    def _check_gpu_options(self) -> Settings:
        try:
            self.gpu_options()
        except GpuOptionsError as exc:
            raise ValueError(str(exc)) from None
        return self

    def gpu_options(self) -> GpuOptions:
        """The engine's GPU options these settings give."""
        return GpuOptions(
            batch_buckets=parse_buckets(self.batch_buckets),
            cuda_graphs=self.cuda_graphs,
            pinned_host_memory=self.pinned_host_memory,
            trt_cache_dir=self.trt_cache_dir,
            trt_fp16=self.trt_fp16,
        )

    def spec_options(self) -> SpecOptions:
        """The explicit model description these settings give."""
        values = {name: getattr(self, name) for name in SPEC_FIELDS}
        return options_from_values({**values, "name": self.model_name}, where="settings (flags / VITSERVE_* variables)")

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def decode_formats(self) -> tuple[str, ...]:
        return parse_formats(self.image_formats)

    def request_pixel_budget(self) -> int:
        return self.max_request_pixels or 4 * self.max_image_pixels

    def decoding_pixel_capacity(self) -> int:
        return self.max_decoding_pixels or 2 * self.max_image_pixels

    def request_decode_slots(self, preprocess_threads: int) -> int:
        """Images of one request decoding at once: never every thread of the pool, when it has two or more."""
        return self.max_request_decodes or max(1, preprocess_threads // 2)

    def warmup_sizes(self) -> list[int]:
        sizes = [int(v) for v in self.warmup_batch_sizes.split(",") if v.strip()]
        return sorted(set(sizes or [1, self.max_batch_size]))

    def check_model_file(self) -> None:
        """Raise a clear error when the model file is missing (called at start-up, not at import)."""
        if not self.model.is_file():
            hint = (
                (
                    " (the bundled demo model is built by `vitserve export`; or point VITSERVE_MODEL / --model "
                    "at an exported .onnx file)"
                )
                if self.model == DEFAULT_MODEL_PATH
                else ""
            )
            raise FileNotFoundError(f"model file not found: {self.model}{hint}")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
