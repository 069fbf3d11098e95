"""`vitserve inspect MODEL.onnx`: what the file holds and what `vitserve serve` would use.

Inputs and outputs with shapes and types, dynamic batch or not, opsets, fused attention nodes and
leftover Softmax, precision, the vitserve metadata found and what is missing, and the effective
model description with the source of every value (the same flags as `serve` may be given).
Exit code 0: servable as is; 1: not servable (the reason is printed); 2: unreadable file or bad flags.
"""

from __future__ import annotations

import argparse
import json
import sys

from service.cli.spec_flags import add_spec_arguments

EXIT_NOT_SERVABLE = 1
EXIT_BAD_INPUT = 2


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show an ONNX file's inputs, outputs, attention fusion, precision and metadata",
        description="Describe an ONNX image classifier as vitserve sees it: inputs/outputs, batch axis, opsets, "
        "fused attention, precision, vitserve metadata found and missing, and the values `vitserve "
        "serve` would use with their sources. Exit 0 when servable, 1 when not.",
    )
    parser.add_argument("model", metavar="MODEL", help="the .onnx file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_spec_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.cli.spec_flags import options_from_args
    from service.core.onnx_summary import format_text, summarize
    from service.core.spec import ModelSpecError

    try:
        options = options_from_args(args)
        summary = summarize(args.model, options)
    except ModelSpecError as exc:
        print(f"vitserve inspect: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FileNotFoundError as exc:
        print(f"vitserve inspect: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime raise their own types for unreadable files
        print(f"vitserve inspect: cannot read {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(summary, indent=2) if args.json else format_text(summary))
    if not summary["servable"]:
        print(f"vitserve inspect: not servable as is: {summary['problem']}", file=sys.stderr)
        return EXIT_NOT_SERVABLE
    return 0
