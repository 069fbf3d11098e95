"""`vitserve serve`: run the HTTP service with uvicorn.

Flags override VITSERVE_* environment variables, which override the defaults (service/core/settings.py).
SIGTERM / Ctrl-C drains: the service keeps listening but answers new requests and /readyz with
503 (so a load balancer takes it out of rotation), finishes every request already accepted,
then exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import sys

from service.core.model_spec import SPEC_FLAGS, add_spec_arguments

# flag -> Settings field; None values (flag not given) leave env/defaults in place.
_FLAGS = (
    ("--model", "model", str, "exported .onnx model (default: the bundled demo model)"),
    ("--host", "host", str, "interface (default 127.0.0.1)"),
    ("--port", "port", int, "TCP port (default 8000; 0 = any free port)"),
    ("--max-batch-size", "max_batch_size", int, "most images per inference"),
    ("--max-queue-delay-ms", "max_queue_delay_ms", float, "longest wait for a batch to fill"),
    ("--max-queue-size", "max_queue_size", int, "queued images before 429"),
    ("--request-timeout-s", "request_timeout_s", float, "deadline per request"),
    ("--max-upload-bytes", "max_upload_bytes", int, "largest request body"),
    ("--max-image-pixels", "max_image_pixels", int, "largest decoded image (width x height)"),
    ("--max-batch-images", "max_batch_images", int, "most images per /v1/classify/batch request"),
    ("--preprocess-threads", "preprocess_threads", int, "decode/resize threads (0 = one per core)"),
    ("--intra-op-threads", "intra_op_threads", int, "ONNX Runtime threads (0 = one per core)"),
    ("--providers", "providers", str, "provider order, e.g. cuda,cpu (default: automatic)"),
    ("--log-level", "log_level", str, "debug, info, warning, error"),
    # Many models and versions (README: "A model repository")
    ("--model-repository", "model_repository", str, "serve DIR/<name>/<version>/model.onnx instead of one --model"),
    ("--model-name", "model_name", str, "name the --model file is served under (default: its architecture)"),
    ("--default-model", "default_model", str, "model /v1/classify serves in a repository"),
    ("--repository-poll-s", "repository_poll_s", float, "re-scan the repository this often (0 = on load calls)"),
    ("--model-memory-budget-bytes", "model_memory_budget_bytes", int, "most bytes of model weights loaded at once"),
    ("--cache-entries", "cache_entries", int, "results kept in the response cache (0 = off)"),
    # GPU engine options (off until a GPU benchmark shows they pay; bench/README.md)
    ("--batch-buckets", "batch_buckets", str, "batch sizes every run is padded to and warmed at, e.g. 1,8,32"),
    ("--cuda-graphs", "cuda_graphs", str, "true/false: one CUDA graph per batch bucket (needs --batch-buckets)"),
    ("--pinned-host-memory", "pinned_host_memory", str, "true/false: stage uploads in page-locked memory (CUDA)"),
    ("--trt-cache-dir", "trt_cache_dir", str, "TensorRT engine and timing cache directory"),
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an exported ONNX model over HTTP",
        description="Serve an exported ONNX ViT over HTTP (/v1 JSON API, KServe v2, /metrics, web page). "
        "Every flag can also be set as VITSERVE_<NAME> in the environment.",
    )
    for flag, dest, kind, help_text in _FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    add_spec_arguments(parser)  # --image-size, --mean, --labels ...: ONNX files from elsewhere
    parser.set_defaults(func=run)


def build_settings(args: argparse.Namespace):
    from service.core.settings import Settings

    dests = [dest for _, dest, _, _ in _FLAGS] + [dest for _, dest, _ in SPEC_FLAGS]
    overrides = {dest: getattr(args, dest) for dest in dests if getattr(args, dest, None) is not None}
    return Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    try:
        settings = build_settings(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"vitserve serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    try:
        settings.check_model_file()
    except FileNotFoundError as exc:
        print(f"vitserve serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from service.http.server import serve
    from service.runtime.engine import EngineError
    from service.serving.lifecycle import build_engine

    # Load the model before uvicorn starts: a file that cannot be served (missing labels, a 3-D
    # input, ...) is one clear line and exit code 2, not a lifespan traceback.
    try:
        engine = build_engine(settings)
    except EngineError as exc:
        print(f"vitserve serve: {exc}", file=sys.stderr)
        return 2
    return serve(settings, engine=engine)
