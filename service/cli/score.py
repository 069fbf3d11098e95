"""`vitserve score`: batch-score a folder, glob, archive or manifest into a .jsonl, .csv or .parquet file.

Same model file, pre-processing and engine as `vitserve serve`, no HTTP. `--ray [ADDRESS]` runs
the same scoring on a Ray cluster with Ray Data (needs the `ray` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    from service.core.settings import DEFAULT_MODEL_PATH

    parser = subparsers.add_parser(
        "score",
        help="batch-score images offline into .jsonl/.csv/.parquet",
        description="Score every image of INPUT (a folder, a glob such as 'photos/**/*.jpg', a zip or tar "
        "archive, or a manifest: .txt or .jsonl, one path per line, relative to it) with an exported model. "
        "Unreadable images are listed with their error. --resume skips what OUTPUT already holds.",
    )
    parser.add_argument(
        "input", metavar="INPUT", help="folder, glob (quote it), .zip/.tar[.gz], or manifest .txt/.jsonl"
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="results file: .jsonl, .csv or .parquet")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="exported .onnx model")
    parser.add_argument("--batch-size", type=int, default=8, help="images per engine run (default 8; GPUs: 32-64)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes (default: one per core; 0 = threads in this process)",
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--resume", action="store_true", help="keep OUTPUT's rows and score only the rest")
    parser.add_argument("--providers", default=None, help="ONNX Runtime provider order, e.g. cuda,cpu")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads (0 = one per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray (Ray Data): no ADDRESS = RAY_ADDRESS or a local instance; "
        "'auto' or ray://host:10001 for a cluster",
    )
    parser.add_argument(
        "--gpus-per-actor",
        type=float,
        default=0.0,
        help="with --ray: GPUs per scoring actor (1 = one actor per GPU; 0 = CPU actors)",
    )
    parser.add_argument(
        "--actors", type=int, default=None, help="with --ray: scoring actors (default: one per GPU, or per CPU slot)"
    )
    from service.cli.spec_flags import add_spec_arguments

    add_spec_arguments(parser)  # ONNX files without vitserve metadata, as for `vitserve serve`
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.cli.spec_flags import options_from_args
    from service.core.spec import ModelSpecError
    from service.runtime.engine import EngineError
    from service.scoring.offline import ScoringError, score

    if not args.model.is_file():
        print(f"vitserve score: model file not found: {args.model}", file=sys.stderr)
        return 2
    progress = None if args.quiet else sys.stderr
    try:
        spec_options = options_from_args(args)
        if args.ray is not None and spec_options.given():
            raise ScoringError(
                "--ray reads the model description from the file or its <model>.json sidecar; "
                "embed flags once with `vitserve export --from-onnx`"
            )
        if args.ray is not None:
            from service.scoring.ray_scoring import score_with_ray

            summary = score_with_ray(
                args.input,
                args.output,
                model=args.model,
                address=args.ray or None,
                batch_size=args.batch_size,
                top_k=args.top_k,
                resume=args.resume,
                gpus_per_actor=args.gpus_per_actor,
                actors=args.actors,
                providers=args.providers,
                progress_stream=progress,
            )
        else:
            from service.core.host import cpu_cores

            workers = args.workers if args.workers is not None else cpu_cores()
            summary = score(
                args.input,
                args.output,
                model=args.model,
                batch_size=args.batch_size,
                workers=workers,
                top_k=args.top_k,
                resume=args.resume,
                providers=args.providers,
                intra_op_threads=args.intra_op_threads,
                progress_stream=progress,
                spec_options=spec_options,
            )
    except (ScoringError, EngineError, ModelSpecError) as exc:
        print(f"vitserve score: {exc}", file=sys.stderr)
        return 2
    model = f"model {summary.model.describe()}: " if summary.model else ""
    print(
        f"vitserve score: {model}{summary.scored} scored, {summary.failed} unreadable (listed with their error), "
        f"{summary.skipped} already in {args.output}; {summary.images_per_second:.1f} images/s"
        + (f", {summary.cpu_ms_per_image:.1f} CPU ms/image" if summary.cpu_seconds else ""),
        file=sys.stderr,
    )
    return 0
